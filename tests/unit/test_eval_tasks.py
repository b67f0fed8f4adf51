"""Task registry, gold extraction per schema, custom tasks, and the bundled task files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from megatron_ghpo.eval.answers import GoldAnswerError, extract_gold, gold_for_reward, last_boxed
from megatron_ghpo.eval.loader import load_task
from megatron_ghpo.eval.tasks import (
    AIME_SAMPLES,
    SEED_MAX_NEW_TOKENS,
    SEED_TEMPERATURE,
    SEED_TOP_P,
    get_task,
    parse_custom_task,
    resolve_tasks,
    task_names,
)

pytestmark = pytest.mark.unit

BUNDLED_ROWS = {"aime24": 30, "aime25": 30, "amc23": 40, "math500": 500, "minerva": 272,
                "olympiadbench": 675, "gsm8k": 1319}  # fmt: skip


def test_last_boxed() -> None:
    assert last_boxed(r"so $\boxed{1}$ then \boxed{\frac{a}{b}} done") == r"\frac{a}{b}"
    assert last_boxed(r"\fbox{7} and nothing else") == "7"
    assert last_boxed(r"The answer is $\boxed 2$.") == "2"  # brace-less MATH form
    assert last_boxed(r"\boxed{\left\{1, 2\right\}}") == r"\left\{1, 2\right\}"
    assert last_boxed("no box here") is None
    assert last_boxed(r"\boxed{unbalanced") is None


def test_extract_gold_per_format() -> None:
    assert extract_gold("204", "text") == "204"
    assert extract_gold(27.0, "number") == "27"
    assert extract_gold(2.5, "number") == "2.5"
    assert extract_gold(["$\\frac{41}{12}$"], "first_of_list") == "$\\frac{41}{12}$"
    assert extract_gold(r"so $x = \boxed{1.6}$ cm.", "last_boxed") == "1.6"
    assert extract_gold("16 - 3 - 4 = <<16-3-4=9>>9\n#### 18", "gsm8k") == "18"
    assert extract_gold("... #### 2,125", "gsm8k") == "2,125"


@pytest.mark.parametrize(
    ("value", "fmt", "match"),
    [(None, "text", "null"), ([], "first_of_list", "non-empty list"), ("no box", "last_boxed", "boxed"),
     ("no trailer", "gsm8k", "####"), ("abc", "number", "number"), ("  ", "text", "empty"), (True, "number", "boolean")],
)  # fmt: skip
def test_extract_gold_errors(value, fmt: str, match: str) -> None:
    with pytest.raises(GoldAnswerError, match=match):
        extract_gold(value, fmt)


def test_gold_for_reward() -> None:
    assert gold_for_reward("204") == r"\boxed{204}"
    assert gold_for_reward("$(-\\infty, 0)$.") == r"\boxed{$(-\infty, 0)$}"
    assert gold_for_reward(r"\boxed{5}") == r"\boxed{5}"


def test_registry_defaults_follow_the_seed_command() -> None:
    assert set(BUNDLED_ROWS) | {"gpqa_diamond"} == set(task_names())
    for name in BUNDLED_ROWS:
        spec = get_task(name)
        assert (spec.temperature, spec.top_p, spec.max_new_tokens) == (
            SEED_TEMPERATURE,
            SEED_TOP_P,
            SEED_MAX_NEW_TOKENS,
        )
        assert spec.samples == (AIME_SAMPLES if name.startswith("aime") else 1)
    assert (SEED_TEMPERATURE, SEED_TOP_P, SEED_MAX_NEW_TOKENS, AIME_SAMPLES) == (0.01, 0.95, 8192, 32)
    assert get_task("math_500").name == "math500" and get_task("gpqa:diamond", path="x.csv").path == "x.csv"


def test_registry_errors() -> None:
    with pytest.raises(KeyError, match="(?i)did you mean 'math500'"):
        get_task("math50")
    with pytest.raises(ValueError, match="--task-path gpqa_diamond=FILE"):
        get_task("gpqa_diamond")
    with pytest.raises(ValueError, match="requested twice"):
        resolve_tasks("aime24,aime24")
    with pytest.raises(ValueError, match="not requested"):
        resolve_tasks("aime24", paths={"math500": "x.jsonl"})


@pytest.mark.parametrize("name", sorted(BUNDLED_ROWS))
def test_bundled_task_loads(name: str) -> None:
    problems = load_task(get_task(name))
    assert len(problems) == BUNDLED_ROWS[name]
    assert len({p.uid for p in problems}) == len(problems)
    for p in problems:
        assert p.uid.startswith(f"{name}/") and p.problem.strip() and p.hint is None
        assert p.answer == gold_for_reward(p.columns["eval_gold"])
        assert p.columns["eval_task"] == name
    assert len(load_task(get_task(name), limit=3)) == 3


def test_bundled_gold_examples() -> None:
    first = {name: load_task(get_task(name), limit=1)[0] for name in BUNDLED_ROWS}
    assert first["aime24"].columns["eval_gold"] == "204"
    assert first["amc23"].columns["eval_gold"] == "27"  # stored as the float 27.0
    assert first["gsm8k"].columns["eval_gold"] == "18"  # after '####'
    assert first["minerva"].columns["eval_gold"] == "1.6"  # last \boxed{} of the solution
    assert first["olympiadbench"].columns["eval_gold"] == "2"  # final_answer[0]
    assert first["math500"].uid == "math500/test/precalculus/807.json"


def test_every_gold_parses_and_a_boxed_gold_scores_one() -> None:
    """With the accuracy reward's own gold parser: no unparseable gold in any bundled task, and a
    completion boxing the parsed gold scores 1.0 (GSM8K: first 300 rows, all plain numbers)."""
    from megatron_ghpo.eval.scoring import check_gold

    limits = {"gsm8k": 300}
    for name in BUNDLED_ROWS:
        problems = load_task(get_task(name), limit=limits.get(name))
        results = [check_gold(p.answer) for p in problems]
        unparsed = [p.uid for p, r in zip(problems, results) if not r["parsed"]]
        self_fail = [p.uid for p, r in zip(problems, results) if not r["self_ok"]]
        assert unparsed == [], f"{name}: unparseable golds {unparsed}"
        assert self_fail == [], f"{name}: a boxed copy of the gold does not score 1.0 for {self_fail}"


def test_custom_jsonl_task(tmp_path: Path) -> None:
    f = tmp_path / "mine.jsonl"
    rows = [{"q": "1+1?", "gt": "2", "key": "a"}, {"q": "2+2?", "gt": "4", "key": "b"}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    spec = parse_custom_task(f"name=mine,path={f},problem=q,answer=gt,id=key,samples=4,temperature=0.7")
    assert (spec.samples, spec.temperature, spec.top_p) == (4, 0.7, SEED_TOP_P)
    problems = load_task(spec)
    assert [p.uid for p in problems] == ["mine/a", "mine/b"]
    assert [p.answer for p in problems] == [r"\boxed{2}", r"\boxed{4}"]
    assert problems[0].columns["q"] == "1+1?"


def test_custom_task_errors(tmp_path: Path) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"question": "x", "solution": "no box"}) + "\n")
    with pytest.raises(ValueError, match="needs column"):
        load_task(parse_custom_task(f"name=bad,path={f}"))
    with pytest.raises(ValueError, match=r"row 0 .*'solution'.*boxed"):
        load_task(parse_custom_task(f"name=bad,path={f},problem=question,answer=solution,format=last_boxed"))
    f.write_text('{"problem": "x", "answer": "1"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: line 2 is not valid JSON"):
        load_task(parse_custom_task(f"name=bad,path={f}"))
    with pytest.raises(ValueError, match="(?i)did you mean 'problem'"):
        parse_custom_task(f"name=bad,path={f},problme=q")
    with pytest.raises(ValueError, match="missing path"):
        parse_custom_task("name=bad")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_task(parse_custom_task(f"name=x,path={tmp_path / 'none.jsonl'}"))


def test_gpqa_multiple_choice_from_csv(tmp_path: Path) -> None:
    f = tmp_path / "gpqa_diamond.csv"
    header = [
        "Record ID",
        "Question",
        "Correct Answer",
        "Incorrect Answer 1",
        "Incorrect Answer 2",
        "Incorrect Answer 3",
    ]
    with f.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for i in range(6):
            w.writerow([f"rec{i}", f"Question {i}?", f"right{i}", f"wrong{i}a", f"wrong{i}b", f"wrong{i}c"])
    spec = resolve_tasks("gpqa_diamond", paths={"gpqa_diamond": str(f)})[0]
    problems = load_task(spec)
    letters = []
    for i, p in enumerate(problems):
        letter = p.columns["eval_gold"]
        letters.append(letter)
        assert p.answer == f"\\boxed{{{letter}}}" and p.uid == f"gpqa_diamond/rec{i}"
        assert f"{letter}) right{i}\n" in p.problem + "\n"
        assert all(f"{ch}) " in p.problem for ch in "ABCD")
    assert load_task(spec)[0].problem == problems[0].problem  # the option order is fixed per row
    assert len(set(letters)) > 1  # the right option does not always sit at the same letter


def test_json_escape_accidents_are_repaired() -> None:
    from megatron_ghpo.eval.loader import repair_escapes

    aime25 = load_task(get_task("aime25"))
    assert "\\frac{\\log_k" in aime25[18].problem and "$\\frac{m}{n}$" in aime25[27].problem
    assert "$\\triangle DEF" in aime25[19].problem
    assert not any(ch in p.problem for p in aime25 for ch in "\x0c\x08\t")
    assert "{\n\treturn 2*sin" in load_task(get_task("math500"), limit=18)[17].problem  # a real TAB stays
    assert repair_escapes("a \x0crac{1}{2} \x08oxed{3} \tab \x08and") == (
        "a \\frac{1}{2} \\boxed{3} \tab \x08and",
        2,
    )
