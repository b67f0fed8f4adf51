"""run_evaluation's aggregation, files and seeds, the in-loop evaluator, and scorer agreement.

The engine here is a ``ReplayEngine``: a RolloutEngine that answers each prompt with texts fixed in
advance (keyed by the rendered prompt's token ids), so the expected pass@k is worked out by hand.
Scoring is the real accuracy reward, in process (``SerialScorer``; the pool path runs in the e2e
tier). Generation by real models is covered by tests/e2e/test_eval_e2e.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import pytest

from megatron_ghpo.data import PromptRenderer
from megatron_ghpo.eval import InLoopEvaluator, SerialScorer, parse_custom_task, run_evaluation
from megatron_ghpo.eval.loader import load_task
from megatron_ghpo.eval.runner import LoadedTask, SamplingOverrides
from megatron_ghpo.records import Completion
from megatron_ghpo.rollout.base import RolloutEngine, SamplingParams

pytestmark = pytest.mark.unit

GRADED = (
    Path(__file__).resolve().parents[1] / "fixtures" / "verifier" / "qwen25math_math_cot_100_graded.jsonl"
)


class ReplayEngine:
    """Answers prompt i with ``texts[i][:n]`` (prompts identified by their token ids); records calls."""

    def __init__(
        self, tokenizer, by_prompt: dict[tuple[int, ...], list[str]], *, length_after: int | None = None
    ):
        self.tokenizer, self.by_prompt, self.length_after = tokenizer, by_prompt, length_after
        self.calls: list[tuple[int, SamplingParams]] = []

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> list[list[Completion]]:
        self.calls.append((len(prompt_token_ids), sampling))
        out = []
        for ids in prompt_token_ids:
            texts = self.by_prompt[tuple(ids)]
            assert len(texts) >= sampling.n, "the test scripted fewer texts than the evaluation asked for"
            comps = []
            for t in texts[: sampling.n]:
                toks = self.tokenizer(t, add_special_tokens=False)["input_ids"]
                reason = (
                    "length" if self.length_after is not None and len(toks) >= self.length_after else "stop"
                )
                comps.append(Completion(token_ids=toks, text=t, finish_reason=reason))
            out.append(comps)
        return out

    def load_weights(self, weights: Iterable) -> None:
        raise NotImplementedError("ReplayEngine replays fixed texts; it has no weights")

    @property
    def weight_version(self) -> int:
        return 0

    def sleep(self) -> None: ...
    def wake(self) -> None: ...
    def close(self) -> None: ...


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from megatron_ghpo.models.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def _task(tmp_path: Path, rows: list[dict], **extra: str):
    f = tmp_path / "toy.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    opts = "".join(f",{k}={v}" for k, v in extra.items())
    return parse_custom_task(f"name=toy,path={f},problem=q,answer=a{opts}")


def _replay(tokenizer, renderer, spec, texts: list[list[str]], **kw) -> ReplayEngine:
    problems = load_task(spec)
    return ReplayEngine(
        tokenizer, {tuple(renderer.render(p).token_ids): t for p, t in zip(problems, texts)}, **kw
    )


def test_pass_at_k_files_and_seeds(tokenizer, tmp_path: Path) -> None:
    rows = [{"q": "What is 1+1?", "a": "2"}, {"q": "What is 2+3?", "a": "5"},
            {"q": "What is 3*3?", "a": "9"}, {"q": "Name a color.", "a": "\\text{}"}]  # fmt: skip
    spec = _task(tmp_path, rows)
    right, wrong = "so \\boxed{%s}", "I think \\boxed{0}"
    texts = [
        [right % 2, wrong, right % 2, wrong],  # 2 of 4 correct
        [wrong, wrong, wrong, wrong],  # 0 of 4
        [right % 9] * 4,  # 4 of 4
        ["\\boxed{7}"] * 4,
    ]  # gold does not parse: left out of the metrics
    renderer = PromptRenderer(tokenizer, system_prompt="Be brief.", max_prompt_length=512)
    engine = _replay(tokenizer, renderer, spec, texts)
    assert isinstance(engine, RolloutEngine)
    report = run_evaluation(engine, renderer, [spec], samples=4, scorer=SerialScorer(), out_dir=tmp_path / "out",
                            chunk_size=3, sampling=SamplingOverrides(seed=10, temperature=0.6))  # fmt: skip
    (task,) = report.tasks
    assert (task.num_problems, task.num_scored, task.unparseable_gold, task.samples) == (4, 3, 1, 4)
    # pass@1 = mean(2/4, 0, 1) = 1/2; pass@2 = mean(1 - C(2,2)/C(4,2), 0, 1) = mean(5/6, 0, 1) = 11/18;
    # pass@4 = mean(1, 0, 1) = 2/3.
    assert task.pass_at_k == pytest.approx({1: 0.5, 2: 11 / 18, 4: 2 / 3})
    # Accuracy of each of the 4 runs over the 3 scored problems: 2/3, 1/3, 2/3, 1/3; deviations from 1/2 are
    # +-1/6, so the sample variance is 4 * (1/36) / 3 = 1/27.
    assert task.pass_at_1_std == pytest.approx(27**-0.5)
    assert report.metrics() == pytest.approx({"eval/toy/pass@1": 0.5, "eval/toy/pass@2": 11 / 18,
                                              "eval/toy/pass@4": 2 / 3, "eval/avg/pass@1": 0.5,
                                              "eval/avg/pass@2": 11 / 18, "eval/avg/pass@4": 2 / 3})  # fmt: skip
    # Chunks of 3 prompts then 1; prompt i draws from seed + i * n whatever the chunking.
    assert [(n, s.seed, s.n, s.temperature, s.top_p, s.max_tokens) for n, s in engine.calls] == [
        (3, 10, 4, 0.6, 0.95, 8192),
        (1, 22, 4, 0.6, 0.95, 8192),
    ]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["tasks"]["toy"]["pass_at_k"]["pass@2"] == pytest.approx(11 / 18)
    assert summary["average"]["pass@1"] == pytest.approx(0.5)
    lines = [json.loads(x) for x in (tmp_path / "out" / "samples_toy.jsonl").read_text().splitlines()]
    assert len(lines) == 16
    first = lines[0]
    assert (
        first["uid"] == "toy/0"
        and first["gold"] == "2"
        and first["extracted"] == "2"
        and first["correct"] is True
    )
    assert "Be brief." in first["prompt"] and first["prompt"].endswith("<|im_start|>assistant\n")
    assert lines[1]["extracted"] == "0" and lines[1]["correct"] is False
    assert {x["correct"] for x in lines if x["uid"] == "toy/3"} == {None}
    assert "pass@1" in (tmp_path / "out" / "results.txt").read_text()


def test_overrides_truncation_and_limit(tokenizer, tmp_path: Path) -> None:
    spec = _task(tmp_path, [{"q": "x" * 50, "a": "1"}, {"q": "y", "a": "2"}], samples=2)
    renderer = PromptRenderer(tokenizer, system_prompt=None, max_prompt_length=16)
    engine = _replay(
        tokenizer, renderer, spec, [["\\boxed{1}", "no answer at all"], ["\\boxed{2}"] * 2], length_after=9
    )
    report = run_evaluation(engine, renderer, [spec], limit=1, scorer=SerialScorer(),
                            sampling=SamplingOverrides(max_new_tokens=33, top_p=0.5))  # fmt: skip
    (task,) = report.tasks
    assert (task.num_problems, task.samples, task.truncated_prompts) == (1, 2, 1)
    assert task.pass_at_k == {1: 0.5, 2: 1.0}
    assert task.truncated_fraction == 0.5  # "\\boxed{1}" is 9 tokens: finish_reason "length"
    assert (engine.calls[0][1].max_tokens, engine.calls[0][1].top_p, engine.calls[0][1].temperature) == (
        33,
        0.5,
        0.01,
    )


def test_engine_contract_violation_is_reported(tokenizer, tmp_path: Path) -> None:
    spec = _task(tmp_path, [{"q": "q", "a": "1"}], samples=3)
    renderer = PromptRenderer(tokenizer, system_prompt=None, max_prompt_length=64)
    engine = _replay(tokenizer, renderer, spec, [["\\boxed{1}"] * 3])
    short = engine.generate
    engine.generate = lambda ids, s: [c[:1] for c in short(ids, s)]
    with pytest.raises(RuntimeError, match="n completions per prompt"):
        run_evaluation(engine, renderer, [spec], scorer=SerialScorer())


def test_in_loop_evaluator_shards_and_reduces(tokenizer, tmp_path: Path) -> None:
    rows = [{"q": f"What is {i}+0?", "a": str(i)} for i in range(5)]
    spec = _task(tmp_path, rows)
    renderer = PromptRenderer(tokenizer, system_prompt=None, max_prompt_length=64)
    texts = [[f"\\boxed{{{i if i % 2 == 0 else -1}}}"] * 2 for i in range(5)]  # problems 0, 2, 4 right
    engine = _replay(tokenizer, renderer, spec, texts)
    whole = InLoopEvaluator(renderer, [spec], samples=2, scorer=SerialScorer(), out_root=tmp_path / "ev")
    assert whole(engine, step=10) == pytest.approx({"eval/toy/pass@1": 0.6, "eval/avg/pass@1": 0.6})
    assert (tmp_path / "ev" / "step_10" / "summary.json").is_file()
    # Two ranks: rank 1 holds problems 1, 3 (0 right); rank 0 holds 0, 2, 4 (3 right). The all-reduce sums.
    sent: list[list[float]] = []
    rank1 = InLoopEvaluator(renderer, [spec], samples=2, scorer=SerialScorer(), shard=(1, 2),
                            all_reduce=lambda v: sent.append(v) or v)  # fmt: skip
    assert rank1(engine, step=1)["eval/toy/pass@1"] == 0.0
    rank0 = InLoopEvaluator(renderer, [spec], samples=2, scorer=SerialScorer(), shard=(0, 2),
                            all_reduce=lambda v: [a + b for a, b in zip(v, sent[0])])  # fmt: skip
    assert rank0(engine, step=1) == pytest.approx({"eval/toy/pass@1": 0.6, "eval/avg/pass@1": 0.6})
    # Problems already in memory (e.g. a held-out split) evaluate the same way.
    held_out = LoadedTask(spec=spec, problems=load_task(spec)[:2])
    assert InLoopEvaluator(renderer, [held_out], samples=2, scorer=SerialScorer())(
        engine, step=2
    ) == pytest.approx({"eval/toy/pass@1": 0.5, "eval/avg/pass@1": 0.5})
    assert InLoopEvaluator.due(20, 10) and not InLoopEvaluator.due(0, 10) and not InLoopEvaluator.due(15, 10)
    with pytest.raises(ValueError, match="all_reduce"):
        InLoopEvaluator(renderer, [spec], shard=(0, 2))


def test_agreement_with_graded_responses(tokenizer) -> None:
    """The 800 graded MATH responses (8 per problem) as an evaluation task whose engine replays them:
    the evaluation's verdicts agree with the file's automatic labels except where the label is the
    grader's known false negative (gold ``10{,}000``, answer ``10000``: flagged in SOURCES.md)."""
    rows = [json.loads(x) for x in GRADED.read_text().splitlines()]
    spec = parse_custom_task(f"name=graded,path={GRADED},problem=question,answer=gt,id=idx,samples=8")
    renderer = PromptRenderer(tokenizer, system_prompt=None, max_prompt_length=4096)
    engine = _replay(tokenizer, renderer, spec, [r["response"] for r in rows])
    scorer = SerialScorer()
    verdicts: list[bool | None] = []

    class Recording:
        def score(self, golds, texts):
            out = scorer.score(golds, texts)
            verdicts.extend(s.correct for s in out)
            return out

    report = run_evaluation(engine, renderer, [spec], scorer=Recording(), chunk_size=50)
    labels = [bool(s) for r in rows for s in r["score"]]
    golds = [r["gt"] for r in rows for _ in r["score"]]
    disagree = [(g, lab) for v, lab, g in zip(verdicts, labels, golds) if v is not lab]
    assert len(verdicts) == 800 and None not in verdicts
    assert disagree == [("10{,}000", False)], disagree
    assert report.tasks[0].pass_at_1 == pytest.approx(729 / 800)


def test_scorer_is_the_accuracy_reward() -> None:
    """The evaluation's worker function returns the accuracy reward's own value (plus the extracted answer)."""
    from megatron_ghpo.eval.answers import gold_for_reward
    from megatron_ghpo.eval.scoring import score_with_answer
    from megatron_ghpo.rewards.math_tasks import score_accuracy

    rows = [json.loads(x) for x in GRADED.read_text().splitlines()][:40]
    pairs = [(gold_for_reward(r["gt"]), t) for r in rows for t in r["response"][:4]]
    pairs += [("\\boxed{\\text{}}", "\\boxed{1}"), ("\\boxed{3}", "no answer")]
    for gold, text in pairs:
        reward, extracted = score_with_answer(gold, text)
        assert reward == score_accuracy(gold, text)
        assert (extracted is None) == (text == "no answer")
