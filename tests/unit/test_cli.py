"""The `megatron-ghpo` console script: dry-run output and error exits, run as a user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT / "examples" / "qwen2.5-math-7b" / "ghpo.yaml"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_ghpo.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def test_seed_dry_run_prints_layout():
    r = run("train", "--config", str(SEED), "--dry-run")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for needle in ("rl_type: ghpo", "num_generations: 8", "hint_ladder: [0.25, 0.5, 0.75]",
                   "rewards: accuracy=1, format=0.5", "TP 1 x PP 1 x DP 1", "28 prompts per optimizer step"):
        assert needle in out, (needle, out)
    assert "is ignored" in r.stderr


def test_dry_run_with_world_size_and_parallel_overrides():
    r = run("train", "--config", str(SEED), "--dry-run", "--set", "world_size=8",
            "--set", "tensor_model_parallel_size=2", "--set", "pipeline_model_parallel_size=2")
    assert r.returncode == 0, r.stderr
    assert "world_size=8 = TP 2 x PP 2 x DP 2" in r.stdout


def test_misspelt_key_exits_nonzero_with_suggestion():
    r = run("train", "--config", str(SEED), "--dry-run", "--set", "num_generation=4")
    assert r.returncode != 0
    assert "did you mean num_generations?" in r.stderr


def test_invalid_value_exits_nonzero_naming_field():
    r = run("train", "--config", str(SEED), "--dry-run", "--set", "hint_ladder=[0.75,0.5]")
    assert r.returncode != 0
    assert "hint_ladder=[0.75, 0.5]: must be strictly increasing" in r.stderr


def test_help_config_lists_keys():
    r = run("train", "--help-config")
    assert r.returncode == 0 and "num_generations" in r.stdout and "hint_ladder" in r.stdout
