"""`megatron-ghpo train` with `rollout_mode: server` (2 TP ranks) against a rollout-server process:
GHPO steps with the server's log-probs checked against the policy after every sync; the server is
killed mid-run and the trainer stops with a clear error within the configured timeout; a fresh
server and `--resume auto` finish the run from the last checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_ghpo.config_loader import FIELDS

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(
    "rollout_mode" not in FIELDS, reason="config has no rollout_mode key yet (server mode not wired into the trainer)")]

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from test_rollout_server import free_port, start_server, stop
from test_trainer import base_args, cli

TIMEOUT_S = 15


def test_server_mode_trains_survives_server_death_and_resumes(tmp_path):
    from megatron_ghpo.data.synthetic import generate_problems, write_jsonl
    from megatron_ghpo.models.tiny import build_tiny_model
    from megatron_ghpo.train.metrics import read_metrics

    ws = {"model": build_tiny_model(tmp_path / "model", hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                                    intermediate_size=256, initializer_range=0.2, seed=0),
          "data": write_jsonl(generate_problems(64, seed=0, difficulty="easy"), tmp_path / "train.jsonl")}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    out = tmp_path / "run"
    args = base_args(ws, out, 4, "--set", "save_steps=2", "--set", "check_weight_sync=true",
                     "--set", "rollout_mode=server", "--set", f"rollout_server_url={url}",
                     "--set", f"rollout_server_timeout_s={TIMEOUT_S}", "--set", "rollout_server_ready_timeout_s=120")
    server = start_server(ws["model"], port, tmp_path / "server1.log", "--max-model-len", "81", "--dtype", "float32")
    p = cli(args)
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoints" / "step_2" / "COMPLETE").exists():
            assert p.poll() is None, p.stdout.read()[-5000:]
            assert time.monotonic() < deadline, "no checkpoint at step 2 in time"
            time.sleep(0.2)
        os.killpg(server.pid, signal.SIGKILL)
        killed = time.monotonic()
        try:
            log, _ = p.communicate(timeout=TIMEOUT_S * 3 + 30)
        except subprocess.TimeoutExpired:
            pytest.fail("the trainer kept running after its rollout server died")
        assert p.returncode != 0
        assert time.monotonic() - killed < TIMEOUT_S * 3 + 30
        assert f"rollout server {url}" in log, log[-4000:]
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        stop(server)
    server = start_server(ws["model"], port, tmp_path / "server2.log", "--max-model-len", "81", "--dtype", "float32")
    try:
        p = cli(args + ["--resume", "auto"])
        log, _ = p.communicate(timeout=400)
        assert p.returncode == 0, log[-5000:] + (tmp_path / "server2.log").read_text()[-2000:]
        server.wait(timeout=60)  # the trainer shuts its server down when it ends
    finally:
        stop(server)
    rows = {r["step"]: r for r in read_metrics(out / "metrics.jsonl")}
    assert sorted(rows) == [1, 2, 3, 4]
    for r in rows.values():
        assert r["rollout/sync_max_logprob_diff"] <= 1e-4, r
