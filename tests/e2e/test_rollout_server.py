"""Split layout on CPU: a `rollout-server` process (vLLM behind HTTP) and a 2-rank job that trains on
its rollouts and pushes weights over the gloo weight channel; plus the failure modes (server not
up, server frozen, server killed) that must raise a clear error naming the URL within the timeout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def free_port() -> int:
    from megatron_ghpo.train.launcher import free_port as fp

    return fp()


def start_server(model: str, port: int, log: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    cmd = [sys.executable, "-m", "megatron_ghpo.rollout.server", "--model", model, "--host", "127.0.0.1",
           "--port", str(port), "--max-model-len", "128", "--kv-cache-gb", "0.25", "--channel-timeout-s", "20", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from megatron_ghpo.models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("rollout_server")
    # head size 32 (vLLM's CPU attention needs >= 32), large init so models are told apart
    model = build_tiny_model(root / "model", hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                             intermediate_size=128, initializer_range=0.2, seed=0)
    port = free_port()
    proc = start_server(model, port, root / "server.log")
    yield {"root": root, "model": model, "url": f"http://127.0.0.1:{port}", "proc": proc, "log": root / "server.log"}
    stop(proc)


def test_server_not_up_gives_a_timeout_error_naming_the_url():
    from megatron_ghpo.rollout.remote import RemoteRolloutEngine

    url = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=url.replace(".", r"\.")) as err:
        RemoteRolloutEngine(url, timeout_s=5, ready_timeout_s=1.5)
    assert time.monotonic() - t0 < 10
    assert "rollout_server_ready_timeout_s" in str(err.value)
    with pytest.raises(ValueError, match="http://HOST:PORT"):
        RemoteRolloutEngine("node0:8000", ready_timeout_s=1)


def test_two_rank_training_syncs_weights_into_the_server(server):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    # bucket of 16 KiB: the embedding (98 KB) travels alone, the small tensors share buckets
    launch = ("import sys; from megatron_ghpo.train.launcher import spawn_local; "
              "sys.exit(spawn_local('_rollout_server_worker', sys.argv[1:], 2, timeout_s=200, threads_per_rank=1))")
    try:
        done = subprocess.run(check=False, args=[sys.executable, "-c", launch, server["model"], server["url"], "3", str(16 << 10)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"2-rank job did not finish in 240 s:\n{(exc.stdout or '')[-4000:]}")
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-5000:] + "\n--- server ---\n" + server["log"].read_text()[-3000:]
    report = json.loads(next(line for line in log.splitlines() if line.startswith("RESULT "))[7:])
    assert report["versions"] == [1, 2, 3] and report["server_versions"] == [1, 2, 3], report
    assert all(d <= 1e-4 for d in report["sample_diff"]), report  # sampling log-probs = policy's, every step
    assert all(d <= 1e-4 for d in report["sync_diff"]), report  # after each sync: server = policy
    assert report["changed"][-1] > 1e-2, report  # the policy moved, so the sync check could fail


def test_frozen_then_killed_server_fails_fast_with_the_url(server):
    from safetensors.torch import load_file

    from megatron_ghpo.rollout.base import SamplingParams
    from megatron_ghpo.rollout.remote import RemoteRolloutEngine, RolloutServerError

    url, proc = server["url"], server["proc"]
    engine = RemoteRolloutEngine(url, timeout_s=3, ready_timeout_s=120, bucket_bytes=1 << 16)
    assert engine.generate([[2, 3, 4]], SamplingParams(n=2, max_tokens=4, seed=0))[0][1].token_ids
    weights = load_file(str(Path(server["model"]) / "model.safetensors"))
    os.killpg(proc.pid, signal.SIGSTOP)  # alive but not answering: HTTP and the channel must time out
    try:
        for call in (lambda: engine.generate([[2, 3]], SamplingParams(n=1, max_tokens=2)),
                     lambda: engine.load_weights(iter(weights.items()))):
            t0 = time.monotonic()
            with pytest.raises(RolloutServerError, match=url.replace(".", r"\.")):
                call()
            assert time.monotonic() - t0 < 3 * 3 + 5, time.monotonic() - t0
    finally:
        os.killpg(proc.pid, signal.SIGCONT)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    t0 = time.monotonic()
    with pytest.raises(RolloutServerError, match="is the server process alive"):
        engine.score_tokens([[1, 2, 3]])
    assert time.monotonic() - t0 < 3
