"""The NeMo-Run local executor runs the tiny CPU recipe end to end on this machine: slurm/recipes.py
(launch venv) -> slurm/ghpo_node.sh -> torchrun with 2 ranks -> `megatron-ghpo train`."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
LAUNCH_PY = ROOT / ".venv-launch" / "bin" / "python"


@pytest.mark.skipif(not LAUNCH_PY.exists(), reason="NeMo-Run launch env missing: run "
                    "`python3.11 -m venv .venv-launch && .venv-launch/bin/pip install nemo-run==0.11.1 leptonai==0.27.3`")
def test_local_executor_runs_the_tiny_recipe(tmp_path):
    from megatron_ghpo.data.synthetic import generate_problems, write_jsonl
    from megatron_ghpo.models.tiny import build_tiny_model
    from megatron_ghpo.train.metrics import read_metrics

    model = build_tiny_model(tmp_path / "model", hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                             intermediate_size=256, initializer_range=0.2, seed=0)
    data = write_jsonl(generate_problems(32, seed=0, difficulty="easy"), tmp_path / "train.jsonl")
    out = tmp_path / "run"
    sets = {"model_name_or_path": model, "dataset_name": data, "output_dir": out, "max_steps": 2,
            "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "num_generations": 4,
            "max_completion_length": 16, "save_strategy": "'no'", "vllm_kv_cache_gb": 0.25}
    cmd = [str(LAUNCH_PY), "slurm/recipes.py", "--recipe", "tiny", "--executor", "local",
           "--job-dir", str(tmp_path / "jobs"), "--python", str(ROOT / ".venv" / "bin" / "python")]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    env = {**os.environ, "NEMORUN_HOME": str(tmp_path / "nemorun"), "VLLM_LOGGING_LEVEL": "WARNING"}
    try:
        done = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=360,
                              start_new_session=True)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"local recipe did not finish in 360 s:\n{str(exc.stdout)[-4000:]}")
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-6000:]
    assert "torch.distributed.run --standalone --nnodes 1 --nproc-per-node 2" in log  # torchrun, 2 ranks
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2], rows
    assert all(isinstance(r["train/loss"], float) for r in rows)
    assert (out / "hf" / "config.json").is_file()
