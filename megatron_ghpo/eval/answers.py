"""Gold-answer extraction for the evaluation files' schemas.

Each benchmark stores its gold answer differently (a plain ``answer`` string, an AMC float, a
one-element ``final_answer`` list, the last ``\\boxed{}`` of a worked ``solution``, GSM8K's
``#### 42`` trailer). These functions turn one raw field value into the bare answer text; the
task registry then wraps it in ``\\boxed{}`` so the accuracy reward's gold parser (math-verify,
first match) reads it without relying on anchor-less extraction.
"""

from __future__ import annotations

import math
from typing import Any

from megatron_ghpo.data.answers import last_boxed

ANSWER_FORMATS = ("text", "number", "first_of_list", "last_boxed", "gsm8k")
"""How a task's answer field is read:

- ``text``: the field is the answer (a string);
- ``number``: the field is a JSON number (AMC23 stores ``27.0``); integral floats become ``"27"``;
- ``first_of_list``: the field is a non-empty list whose first element is the answer (OlympiadBench);
- ``last_boxed``: the field is a worked solution; the answer is its last ``\\boxed{...}`` (or ``\\fbox``);
- ``gsm8k``: the field is a worked solution ending in ``#### <answer>``.
"""


class GoldAnswerError(ValueError):
    """A row's answer field cannot be read in the task's answer format."""


def _format_number(value: float) -> str:
    if isinstance(value, bool):
        raise GoldAnswerError(f"expected a number, got the boolean {value!r}")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise GoldAnswerError(f"expected a finite number, got {value!r}")
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


def extract_gold(value: Any, answer_format: str) -> str:
    """The bare gold answer text of one row's answer field; raises GoldAnswerError when unreadable."""
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format={answer_format!r}: expected one of {ANSWER_FORMATS}")
    if value is None:
        raise GoldAnswerError("the answer field is null")
    if answer_format == "number":
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError as exc:
                raise GoldAnswerError(f"expected a number, got the string {value!r}") from exc
        if not isinstance(value, (int, float)):
            raise GoldAnswerError(f"expected a number, got {type(value).__name__} {value!r}")
        return _format_number(value)
    if answer_format == "first_of_list":
        if not isinstance(value, list) or not value:
            raise GoldAnswerError(f"expected a non-empty list, got {type(value).__name__} {value!r:.80}")
        value = value[0]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = _format_number(value)
    if not isinstance(value, str):
        raise GoldAnswerError(f"expected a string, got {type(value).__name__} {value!r:.80}")
    if answer_format == "last_boxed":
        boxed = last_boxed(value)
        if boxed is None:
            raise GoldAnswerError(f"no \\boxed{{...}} in the solution {value[-80:]!r}")
        value = boxed
    elif answer_format == "gsm8k":
        if "####" not in value:
            raise GoldAnswerError(f"no '#### <answer>' trailer in {value[-80:]!r}")
        value = value.rsplit("####", 1)[1]
    text = value.strip()
    if not text:
        raise GoldAnswerError("the answer is empty")
    return text


def gold_for_reward(answer: str) -> str:
    """Wrap a bare gold answer so math-verify's first-match LaTeX extraction reads all of it.

    A trailing sentence period after a closing ``$`` (OlympiadBench writes ``$...$.``) is dropped.
    """
    text = answer.strip()
    if text.endswith("$."):
        text = text[:-1]
    if text.startswith("\\boxed{") and last_boxed(text) is not None and text.endswith("}"):
        return text
    return f"\\boxed{{{text}}}"
