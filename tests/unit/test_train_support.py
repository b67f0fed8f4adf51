"""Checkpoint folder protocol, metrics log, and the local launcher's failure handling."""

from __future__ import annotations

import json
import sys
import time

import pytest

from megatron_ghpo.train import checkpointing as ck
from megatron_ghpo.train.launcher import spawn_local
from megatron_ghpo.train.metrics import MetricsLogger, read_metrics

pytestmark = pytest.mark.unit


def make_ckpt(out, step, complete=True):
    d = ck.tmp_dir(out, step)
    d.mkdir(parents=True)
    (d / "model.bin").write_text("x")
    if complete:
        return ck.publish(out, step, {"step": step})
    return d


def test_resume_auto_picks_newest_complete_and_ignores_partial(tmp_path):
    make_ckpt(tmp_path, 2)
    make_ckpt(tmp_path, 4)
    make_ckpt(tmp_path, 6, complete=False)  # interrupted while being written
    (ck.checkpoint_root(tmp_path) / "step_8").mkdir()  # renamed by hand, no marker
    assert ck.latest_checkpoint(tmp_path).name == "step_4"
    assert ck.resolve_resume(tmp_path, "auto", False).name == "step_4"
    with pytest.raises(FileNotFoundError, match="no COMPLETE marker"):
        ck.resolve_resume(tmp_path, str(ck.checkpoint_root(tmp_path) / "step_8"), False)


def test_fresh_run_refuses_folder_with_checkpoints(tmp_path):
    assert ck.resolve_resume(tmp_path, None, False) is None
    make_ckpt(tmp_path, 3)
    with pytest.raises(FileExistsError, match="already holds 1 checkpoint.*--resume auto"):
        ck.resolve_resume(tmp_path, None, False)
    assert ck.resolve_resume(tmp_path, None, True) is None


def test_save_total_limit_keeps_newest_and_sweeps_tmp(tmp_path):
    for s in (1, 2, 3, 4):
        make_ckpt(tmp_path, s)
    make_ckpt(tmp_path, 5, complete=False)
    ck.enforce_limit(tmp_path, 2)
    assert [s for s, _ in ck.complete_checkpoints(tmp_path)] == [3, 4]
    assert not ck.tmp_dir(tmp_path, 5).exists()


def test_metrics_jsonl_and_resume_truncation(tmp_path):
    m = MetricsLogger(tmp_path, enabled=True, report_to=[], run_name=None, wandb_project="p", wandb_mode="disabled")
    for s in (1, 2, 3):
        m.log(s, {"train/loss": 0.5 * s, "train/grad_norm": float("nan")})
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[1]["train/loss"] == 1.0
    assert rows[0]["train/grad_norm"] == "nan"
    MetricsLogger(tmp_path, enabled=True, report_to=[], run_name=None, wandb_project="p", wandb_mode="disabled",
                  resume_step=2)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    json.dumps(rows)


def test_launcher_stops_all_ranks_when_one_fails(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(
        "import os, sys, time\n"
        "if os.environ['RANK'] == '1':\n    sys.exit(3)\n"
        "time.sleep(60)\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        t0 = time.monotonic()
        code = spawn_local("job", [], 2, timeout_s=30, extra_env={"PYTHONPATH": str(tmp_path)})
        assert code == 3 and time.monotonic() - t0 < 25
        script.write_text("import time\ntime.sleep(60)\n")
        assert spawn_local("job", [], 2, timeout_s=2, extra_env={"PYTHONPATH": str(tmp_path)}) == 124
    finally:
        sys.path.remove(str(tmp_path))


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not yet reaped) counts as gone
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_ranks_die_with_a_launcher_killed_by_sigkill(tmp_path):
    """`kill -9` of the launcher from a shell must not leave its ranks training on as orphans."""
    import os
    import signal
    import subprocess

    (tmp_path / "job.py").write_text(
        "import os, pathlib, sys, time\n"
        f"pathlib.Path({str(tmp_path)!r}, 'rank' + os.environ['RANK']).write_text(str(os.getpid()))\n"
        "time.sleep(120)\n"
    )
    launcher = subprocess.Popen(
        [sys.executable, "-c", ("import sys; from megatron_ghpo.train.launcher import spawn_local; "
                                "sys.exit(spawn_local('job', [], 2, timeout_s=110))")],
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])})
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"rank{r}").is_file() and (tmp_path / f"rank{r}").read_text() for r in (0, 1)):
            assert time.monotonic() < deadline and launcher.poll() is None, "ranks did not start"
            time.sleep(0.1)
        pids = [int((tmp_path / f"rank{r}").read_text()) for r in (0, 1)]
        assert all(_alive(p) for p in pids)
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids), "ranks outlived their launcher"
    finally:
        if launcher.poll() is None:
            launcher.kill()


def test_one_job_per_output_dir_and_the_lock_dies_with_its_holder(tmp_path):
    import subprocess

    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", ("import sys, time; from megatron_ghpo.train import checkpointing as ck; "
                                f"ck.lock_output_dir({str(out)!r}); print('locked', flush=True); time.sleep(120)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ck.OutputDirInUse, match=rf"in use by another running job \(pid {holder.pid} "):
            ck.lock_output_dir(out)
        holder.kill()  # SIGKILL: no clean-up runs, the kernel drops the lock
        holder.wait(timeout=10)
        ck.lock_output_dir(out)
        ck.lock_output_dir(out)  # the holder may take it again
        assert f"pid {__import__('os').getpid()} " in (out / ck.LOCK_NAME).read_text()
    finally:
        if holder.poll() is None:
            holder.kill()
