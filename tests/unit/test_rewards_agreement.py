"""Agreement with labelled verifier cases and the 800 graded real responses (fixtures in tests/fixtures/verifier).

Uses the same row -> options mapping as ``tools/benchmarks/verifier_agreement.py`` (which prints the
full per-source table and confusion matrices). ~5 s.
"""

import importlib.util
import json
from pathlib import Path

import pytest

from megatron_ghpo.rewards import VerifierPool
from megatron_ghpo.rewards.functions import ACCURACY_TASK

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "verifier"


def _tool():
    spec = importlib.util.spec_from_file_location(
        "verifier_agreement", ROOT / "tools" / "benchmarks" / "verifier_agreement.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(2, timeout_s=10.0, warm_up=False) as p:
        yield p


def load(name):
    return [json.loads(line) for line in open(FIXTURES / name, encoding="utf-8")]


def test_math_verify_and_reward_rows_agree_under_their_recorded_options(pool):
    tool = _tool()
    rows = [r for r in load("verifier_cases.jsonl") if r["verifier"] != "lighteval_extractive_match"]
    plans = [(r, tool.row_task(r)) for r in rows]
    plans = [(r, p) for r, p in plans if p is not None]
    by_ref: dict[str, list] = {}
    for r, (verifier, ref, args) in plans:
        by_ref.setdefault(ref, []).append((r, verifier, args))
    by_verifier: dict[str, list[bool]] = {}
    for ref, items in by_ref.items():
        for (r, verifier, _), res in zip(items, pool.map(ref, [a for _, _, a in items])):
            assert res.ok, (r["id"], res)
            got = res.value is not None and res.value is not False and res.value != 0.0
            by_verifier.setdefault(verifier, []).append(got == r["expected"])
    assert len(by_verifier["math_verify"]) == 270
    rate = sum(by_verifier["math_verify"]) / 270
    assert rate >= 0.99, rate
    for name in ("open_r1_accuracy_reward", "trl_accuracy_reward", "trl_reasoning_accuracy_reward"):
        assert all(by_verifier[name]), name


def test_confusion_matrix_on_800_graded_responses(pool):
    graded = load("qwen25math_math_cot_100_graded.jsonl")
    items = [
        ("\\boxed{" + r["answer"] + "}", resp, s)
        for r in graded
        for resp, s in zip(r["response"], r["score"])
    ]
    assert len(items) == 800
    res = pool.map(ACCURACY_TASK, [(g, t) for g, t, _ in items], affinity=[g for g, _, _ in items])
    assert all(r.ok for r in res)
    tp = sum(1 for r, (_, _, s) in zip(res, items) if r.value == 1.0 and s)
    tn = sum(1 for r, (_, _, s) in zip(res, items) if r.value != 1.0 and not s)
    assert sum(s for _, _, s in items) == 728
    assert (tp + tn) / 800 >= 0.99, (tp, tn)


def test_every_math_training_gold_parses(pool):
    """The loader's ``\\boxed{<last box>}`` golds parse (bare contents often do not: see data/answers.py).

    Every 8th row (~700) keeps this fast; the whole file (5,584 rows) passed when last run in full.
    """
    from megatron_ghpo.data import load_problems

    path = ROOT / "megatron_ghpo" / "resources" / "train" / "math_train_l3to5.jsonl"
    probs = load_problems(path, on_invalid="skip")[::8]
    res = pool.map(ACCURACY_TASK, [(p.answer, p.answer) for p in probs], affinity=[p.answer for p in probs])
    unparsed = [p.uid for p, r in zip(probs, res) if not r.ok or r.value is None]
    assert unparsed == []
