"""Dataset loading: both schemas, file formats, directories, column mapping, invalid rows, hub errors."""

import json
import logging
from pathlib import Path

import pytest

from megatron_ghpo.data import DatasetUnavailableError, boxed_gold, last_boxed, load_problems

pytestmark = pytest.mark.unit

MATH_FILE = (
    Path(__file__).resolve().parents[2] / "megatron_ghpo" / "resources" / "train" / "math_train_l3to5.jsonl"
)

GHPO_ROWS = [
    {"problem": "What is 1+1?", "solution": "2", "solution_hint": "1+1=2, so \\boxed{2}", "level": 1},
    {
        "problem": "Half of 1?",
        "solution": "\\frac{1}{2}",
        "solution_hint": "It is \\boxed{\\frac12}",
        "level": 2,
    },
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_ghpo_schema(tmp_path):
    probs = load_problems(write_jsonl(tmp_path / "ghpo.jsonl", GHPO_ROWS))
    assert [p.uid for p in probs] == ["ghpo:0", "ghpo:1"]
    assert probs[0].problem == "What is 1+1?" and probs[0].answer == "2"
    assert probs[0].hint == "1+1=2, so \\boxed{2}"
    assert probs[1].columns == GHPO_ROWS[1]  # every original column passes through


def test_math_schema_answer_is_the_last_box_and_hint_the_worked_solution():
    probs = load_problems(MATH_FILE, limit=50)
    assert len(probs) == 50 and probs[0].uid == "train/algebra/0.json"
    assert probs[0].answer == "\\boxed{0}" and probs[0].hint == probs[0].columns["solution"]
    assert probs[1].answer == "\\boxed{8+4i}"


def test_math_file_edge_rows_and_invalid_rows(caplog):
    with pytest.raises(
        ValueError, match=r"math_train_l3to5: row 4296: column 'solution' has no \\boxed.*2 invalid rows"
    ):
        load_problems(MATH_FILE)
    with caplog.at_level(logging.WARNING, logger="megatron_ghpo"):
        probs = load_problems(MATH_FILE, on_invalid="skip")
    assert len(probs) == 5586 - 2
    assert "skipped 2 invalid rows" in caplog.text
    by_uid = {p.uid: p for p in probs}
    assert by_uid["train/algebra/24014.json"].answer == "\\boxed{2}"  # brace-less "\boxed 2"
    assert by_uid["train/algebra/25040.json"].answer == "\\boxed{9}"
    assert len(by_uid) == len(probs)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("\\boxed{1} then \\boxed{\\{1,2\\}}", "\\{1,2\\}"),
        ("\\fbox{7}", "7"),
        ("\\boxed 9$.", "9"),
        ("no box", None),
        ("\\boxed{unbalanced", None),
        ("\\boxedx{3}", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_boxed_gold_wraps_and_rejects_empty():
    assert boxed_gold("x = \\boxed{(0, 12)}") == "\\boxed{(0, 12)}"
    assert boxed_gold("there are $\\boxed{}$ primes") is None


def test_json_parquet_and_directory_with_split(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.json").write_text(json.dumps(GHPO_ROWS))
    pq.write_table(pa.Table.from_pylist(GHPO_ROWS[:1]), tmp_path / "d" / "train-00001.parquet")
    write_jsonl(tmp_path / "d" / "test.jsonl", GHPO_ROWS[:1])
    train = load_problems(tmp_path / "d")
    assert [p.uid for p in train] == ["train-00001:0", "train:0", "train:1"]
    test = load_problems(tmp_path / "d", split="test")
    assert [p.uid for p in test] == ["test:0"]
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": GHPO_ROWS}))
    assert len(load_problems(tmp_path / "wrapped.json")) == 2


def test_column_mapping_and_id_column(tmp_path):
    rows = [{"question": "q1", "gt_answer": 5, "id": "a"}, {"question": "q2", "gt_answer": 2.0, "id": "b"}]
    probs = load_problems(
        write_jsonl(tmp_path / "x.jsonl", rows), prompt_column="question", answer_column="gt_answer"
    )
    assert [(p.uid, p.problem, p.answer, p.hint) for p in probs] == [
        ("a", "q1", "5", None),
        ("b", "q2", "2", None),
    ]
    dup = [{"problem": "q", "solution": "1", "id": 7}, {"problem": "q", "solution": "1", "id": 7}]
    assert [p.uid for p in load_problems(write_jsonl(tmp_path / "dup.jsonl", dup))] == ["dup:0", "dup:1"]


@pytest.mark.parametrize(
    "row, match",
    [
        ({"problem": "", "solution": "1"}, r"bad: row 1: column 'problem' is empty"),
        ({"solution": "1", "problem": None}, r"bad: row 1: column 'problem' is missing"),
        ({"problem": "q", "solution": "   "}, r"bad: row 1: column 'solution' is empty"),
        ({"problem": ["chat"], "solution": "1"}, r"column 'problem' holds a list, expected text"),
    ],
)
def test_invalid_rows_error_names_file_row_column_or_skip(tmp_path, caplog, row, match):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"problem": "ok", "solution": "1"}, row])
    with pytest.raises(ValueError, match=match):
        load_problems(path)
    with caplog.at_level(logging.WARNING, logger="megatron_ghpo"):
        assert len(load_problems(path, on_invalid="skip")) == 1
    assert "skipped 1 invalid rows" in caplog.text


def test_dataset_level_errors(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", GHPO_ROWS)
    with pytest.raises(
        ValueError, match=r"no prompt column 'question'; its columns are \['level', 'problem'"
    ):
        load_problems(path, prompt_column="question")
    with pytest.raises(FileNotFoundError, match="not found; set data.dataset_name"):
        load_problems(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="has no rows"):
        load_problems(tmp_path / "empty.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"problem": "q", "solution": "1"}\n{oops\n')
    with pytest.raises(ValueError, match="broken.jsonl: line 2 is not valid JSON"):
        load_problems(tmp_path / "broken.jsonl")
    with pytest.raises(ValueError, match="answer_from must be one of"):
        load_problems(path, answer_from="boxed")


def test_hub_name_offline_is_a_clear_error():
    with pytest.raises(DatasetUnavailableError, match=r"hub is unreachable.*local files"):
        load_problems("some-org/some-dataset")
