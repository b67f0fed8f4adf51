"""The trainer end to end through the `megatron-ghpo` CLI on a tiny model, TP=2 over 2 gloo ranks:
GHPO steps with weight sync checked against the engine, exact resume after `kill -9`, and the
bad-input cases that must stop with a clear error before any work is lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_ghpo.train.metrics import read_metrics

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 420


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from megatron_ghpo.data.synthetic import generate_problems, write_jsonl
    from megatron_ghpo.models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("trainer")
    model = build_tiny_model(root / "model", hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                             intermediate_size=256, initializer_range=0.2, seed=0)
    data = write_jsonl(generate_problems(64, seed=0, difficulty="easy"), root / "train.jsonl")
    return {"root": root, "model": model, "data": data}


def base_args(ws, out: Path, steps: int, *extra: str) -> list[str]:
    sets = {
        "model_name_or_path": ws["model"], "dataset_name": ws["data"], "output_dir": out,
        "tensor_model_parallel_size": 2, "num_generations": 4, "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 1, "max_completion_length": 16, "max_prompt_length": 64,
        "max_steps": steps, "learning_rate": 1e-3, "lr_scheduler_type": "constant", "report_to": "[none]",
        "reward_funcs": "[accuracy,'_trainer_rewards:digit_share']", "reward_weights": "[1.0,0.5]", "reward_num_workers": 1, "top_k": -1, "vllm_kv_cache_gb": 0.25,
        "rl_type": "ghpo", "hint_split": "line", "system_prompt": "null",
    }
    args = ["train"]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    return args + list(extra)


def cli(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING", "MEGATRON_GHPO_NO_PROGRESS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "megatron_ghpo.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


def run_cli(args: list[str], timeout: float = RUN_TIMEOUT_S) -> tuple[int, str]:
    p = cli(args)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        pytest.fail(f"megatron-ghpo {args[0]} did not finish in {timeout} s:\n{out[-4000:]}")
    return p.returncode, out


def test_ghpo_steps_train_and_sync_into_the_engine(workspace):
    out = workspace["root"] / "run_sync"
    # shared-prompt rows in the train step (the resume test below trains padded)
    rc, log = run_cli(base_args(workspace, out, 3, "--set", "check_weight_sync=true", "--set", "save_steps=3",
                                "--set", "share_prompts=true"))
    assert rc == 0, log[-5000:]
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert isinstance(r["train/loss"], float), r["train/loss"]
        assert r["rollout/sync_max_logprob_diff"] <= 1e-4, r["rollout/sync_max_logprob_diff"]
        assert r["rollout/weight_version"] == r["step"]
        assert r["perf/padded_tokens"] >= r["perf/input_tokens"] > r["train/num_tokens"] > 0
        assert 0 < r["perf/score_s"] + r["perf/generate_s"] < r["perf/rollout_s"]
        assert 0.0 <= r["reward/accuracy"] <= 1.0  # a mean over all scored completions, however many calls
    assert any(r["train/grad_norm"] > 0 for r in rows), "no step had a learning signal"
    assert (out / "config.yaml").is_file()
    ckpt = out / "checkpoints" / "step_3"
    assert (ckpt / "COMPLETE").is_file() and json.loads((ckpt / "COMPLETE").read_text())["step"] == 3
    # parameters changed: the final HF export differs from the folder the run started from
    from safetensors.torch import load_file

    before = load_file(str(Path(workspace["model"]) / "model.safetensors"))
    after = load_file(str(out / "hf" / "model.safetensors"))
    assert sorted(before) == sorted(after)
    changed = [k for k in before if not (before[k] == after[k]).all()]
    assert changed, "no parameter changed after 3 optimizer steps"


def ghpo_yaml_args(ws, out: Path, steps: int, *extra: str) -> list[str]:
    """`megatron-ghpo train --config examples/tiny-cpu/ghpo.yaml` as a user runs it, with this test's
    model, data and sizes (a second reward gives the untrained model a learning signal)."""
    sets = {
        "model_name_or_path": ws["model"], "dataset_name": ws["data"], "output_dir": out, "max_steps": steps,
        "save_steps": 3, "num_generations": 4, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
        "max_completion_length": 16, "max_prompt_length": 64, "learning_rate": 1e-3, "vllm_kv_cache_gb": 0.25,
        "reward_funcs": "[accuracy,'_trainer_rewards:digit_share']", "reward_weights": "[1.0,0.5]",
    }
    args = ["train", "--config", str(ROOT / "examples/tiny-cpu/ghpo.yaml")]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    return args + list(extra)


def _processes_naming(text: str) -> list[int]:
    """Live (non-zombie) processes whose command line contains ``text``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if text in (proc / "cmdline").read_bytes().decode(errors="replace") and \
                    (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def test_resume_after_kill_reproduces_the_uninterrupted_run(workspace):
    # examples/tiny-cpu/ghpo.yaml keeps both kinds of GHPO state that outlive a step: the difficulty
    # memory (hint_start: memory) and the retries set aside for the next step (hint_retry: next_step)
    straight = workspace["root"] / "straight"
    rc, log = run_cli(ghpo_yaml_args(workspace, straight, 6))
    assert rc == 0, log[-5000:]
    resumed = workspace["root"] / "resumed"
    p = cli(ghpo_yaml_args(workspace, resumed, 6))
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not (resumed / "checkpoints" / "step_3" / "COMPLETE").exists():
        assert p.poll() is None, p.stdout.read()[-5000:]
        assert time.monotonic() < deadline, "no checkpoint at step 3 in time"
        time.sleep(0.2)
    # `kill -9 <pid>` from a shell: only the launcher gets the signal; its ranks must not train on as
    # orphans next to the resumed run (they did, and the two jobs' checkpoint sweeps collided)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    deadline = time.monotonic() + 15
    while _processes_naming(str(resumed)) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = _processes_naming(str(resumed))
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"ranks {left} outlived their killed launcher"
    rc, log = run_cli(ghpo_yaml_args(workspace, resumed, 6, "--resume", "auto"))
    assert rc == 0, log[-5000:]
    a = {r["step"]: r for r in read_metrics(straight / "metrics.jsonl")}
    b = {r["step"]: r for r in read_metrics(resumed / "metrics.jsonl")}
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    assert a[4]["ghpo/retried_groups"] > 0, "no retry crossed the checkpoint: the test would not check the carry"
    assert all(a[s]["ghpo/generation_passes"] == 1 for s in a)
    assert any(a[s]["train/grad_norm"] > 0 for s in (4, 5, 6)), "no learning signal after the checkpoint"
    for step in (4, 5, 6):
        for key in ("train/loss", "train/reward", "train/grad_norm", "ghpo/retried_groups", "ghpo/memory_started_groups",
                    "ghpo/difficult_frac_stage0"):
            assert a[step][key] == b[step][key], (step, key, a[step][key], b[step][key])
    # (a second job on a folder in use stops naming the holder: tests/unit/test_train_support.py)


def test_bad_inputs_fail_clearly_without_touching_existing_runs(workspace, tmp_path):
    ws = workspace
    rc, log = run_cli(base_args(ws, tmp_path / "a", 1, "--set", f"dataset_name={tmp_path / 'missing.jsonl'}"), 300)
    assert rc != 0 and "missing.jsonl" in log, log[-3000:]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    rc, log = run_cli(base_args(ws, tmp_path / "b", 1, "--set", f"dataset_name={empty}"), 300)
    assert rc != 0 and "empty.jsonl" in log, log[-3000:]
    no_cfg = tmp_path / "no_config"
    no_cfg.mkdir()
    rc, log = run_cli(base_args(ws, tmp_path / "c", 1, "--set", f"model_name_or_path={no_cfg}"), 300)
    assert rc != 0 and "config.json" in log, log[-3000:]
    occupied = tmp_path / "occupied"
    (occupied / "checkpoints" / "step_2").mkdir(parents=True)
    (occupied / "checkpoints" / "step_2" / "COMPLETE").write_text("{}")
    rc, log = run_cli(base_args(ws, occupied, 1), 300)
    assert rc != 0 and "--resume auto" in log, log[-3000:]
    assert (occupied / "checkpoints" / "step_2" / "COMPLETE").is_file()


def test_sft_warm_up_learns_and_writes_a_loadable_folder(workspace):
    """`megatron-ghpo sft` with the demo's config (TP=2, half the prompts hinted, continuation targets)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = workspace["root"] / "sft"
    sets = {"model_name_or_path": workspace["model"], "dataset_name": workspace["data"], "output_dir": out,
            "max_steps": 24, "per_device_train_batch_size": 16, "logging_steps": 4, "warmup_ratio": 0.0}
    args = ["sft", "--config", str(ROOT / "examples/tiny-cpu/sft.yaml")]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    rc, log = run_cli(args)
    assert rc == 0, log[-5000:]
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [4, 8, 12, 16, 20, 24]
    assert rows[-1]["train/loss"] < 0.7 * rows[0]["train/loss"], [r["train/loss"] for r in rows]
    model = AutoModelForCausalLM.from_pretrained(out / "hf")  # the Hugging Face folder RL runs start from
    base = load_file(Path(workspace["model"]) / "model.safetensors")
    trained = dict(model.state_dict())
    assert any(not torch.equal(trained[k], base[k]) for k in base if k in trained)
