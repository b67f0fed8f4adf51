"""Gold answers from worked solutions: the last ``\\boxed{…}`` (or ``\\fbox{…}``)."""

from __future__ import annotations

import re

_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{…}``/``\\fbox{…}`` in ``text`` (balanced braces), else None.

    The brace-less MATH form ``\\boxed 2`` yields the token after the space (up to whitespace or
    ``$``). An unbalanced last box yields None.
    """
    matches = list(_BOX.finditer(text))
    if not matches:
        return None
    i = matches[-1].end()
    rest = text[i:]
    stripped = rest.lstrip()
    if not stripped.startswith("{"):
        if not rest[:1].isspace() or not stripped:
            return None
        token = stripped.split()[0].split("$")[0]
        return token or None
    start = i + len(rest) - len(stripped)
    depth = 0
    k = start
    while k < len(text):
        c = text[k]
        if c == "\\":
            k += 2  # an escaped brace (\{ or \}) is content, not structure
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : k]
        k += 1
    return None


def boxed_gold(text: str) -> str | None:
    """The gold answer of a worked solution as ``\\boxed{<last boxed content>}``, or None without a box.

    The content is re-wrapped in ``\\boxed{}`` so the accuracy reward's gold parser (math-verify,
    first match) reads it through its LaTeX path: a bare ``(0, 12)`` or ``\\frac43`` would otherwise be
    mis-read or not read at all (measured on the MATH training file: 100 of 1,118 bare answers do not
    parse, 133 parse to the wrong value; wrapped, all parse).
    """
    content = last_boxed(text)
    if content is None or not content.strip():
        return None
    return "\\boxed{" + content + "}"
