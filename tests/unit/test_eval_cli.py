"""`megatron-ghpo eval` arguments: defaults, validation errors (exit 2, one line), model folder kinds."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from megatron_ghpo.eval.cli import DEFAULT_TASKS, SEED_SYSTEM_PROMPT, add_eval_parser, main
from megatron_ghpo.eval.model_source import model_kind

pytestmark = pytest.mark.unit


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="megatron-ghpo")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["eval", *argv])


def test_defaults_follow_the_seed_evaluation() -> None:
    args = _parse("--model", "m")
    assert args.tasks == DEFAULT_TASKS == "aime24,math500,amc23,minerva,olympiadbench"
    assert (args.temperature, args.top_p, args.max_new_tokens, args.samples) == (
        None,
        None,
        None,
        None,
    )  # per task
    assert args.system_prompt == SEED_SYSTEM_PROMPT and args.engine == "vllm" and args.seed == 0
    assert SEED_SYSTEM_PROMPT.endswith(
        "Respond in the following format: <think>\n...\n</think>\n<answer>\n...\n</answer>"
    )
    args = _parse("--model", "m", "--task-path", "GPQA_Diamond=/x.csv", "--custom-task", "name=a,path=b")
    assert args.task_path == [("gpqa_diamond", "/x.csv")] and args.custom_task == ["name=a,path=b"]


def _hf_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    (path / "model.safetensors").write_bytes(b"")
    return path


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tasks", "math50"], "did you mean 'math500'"),
        (["--tasks", "gpqa_diamond"], "--task-path gpqa_diamond=FILE"),
        (["--tasks", "aime24", "--task-path", "math500=x.jsonl"], "not requested"),
        (["--custom-task", "name=x"], "missing path"),
        (["--samples", "0"], "samples=0"),
        (["--temperature", "-1"], "temperature=-1"),
        (["--limit", "0"], "--limit 0"),
        (["--pass-k", "1,a"], "comma-separated integers"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(tmp_path: Path, capsys, argv: list[str], message: str) -> None:
    model = _hf_folder(tmp_path / "m")
    assert main(["--model", str(model), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("eval: error:") and message.lower() in err.lower() and "\n" not in err


def test_model_folder_kinds(tmp_path: Path, capsys) -> None:
    assert model_kind(str(_hf_folder(tmp_path / "hf"))) == "hf"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "metadata.json").write_text("{}")
    assert model_kind(str(ckpt)) == "megatron"
    with pytest.raises(ValueError, match=r"contains model folders: ckpt, hf \(pass one of them\)"):
        model_kind(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        model_kind(str(tmp_path / "missing"))
    assert main(["--model", str(tmp_path / "missing"), "--tasks", "aime24"]) == 2
    assert "no such folder" in capsys.readouterr().err
