"""JSON forms of the rollout records exchanged between the rollout server and its clients."""

from __future__ import annotations

import dataclasses
from typing import Any

from megatron_ghpo.records import Completion
from megatron_ghpo.rollout.base import SamplingParams

_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


def sampling_to_json(s: SamplingParams) -> dict[str, Any]:
    d = dataclasses.asdict(s)
    d["stop"] = list(s.stop)
    return d


def sampling_from_json(d: Any) -> SamplingParams:
    """Rebuild SamplingParams; unknown or mistyped fields raise ValueError naming them."""
    if not isinstance(d, dict):
        raise TypeError(f"'sampling' must be an object with SamplingParams fields, got {type(d).__name__}")
    unknown = sorted(set(d) - _SAMPLING_FIELDS)
    if unknown:
        raise ValueError(f"'sampling' has unknown fields {unknown}; allowed: {sorted(_SAMPLING_FIELDS)}")
    d = dict(d)
    if "stop" in d:
        if not isinstance(d["stop"], list) or not all(isinstance(x, str) for x in d["stop"]):
            raise ValueError("'sampling.stop' must be a list of strings")
        d["stop"] = tuple(d["stop"])
    return SamplingParams(**d)


def completion_to_json(c: Completion) -> dict[str, Any]:
    return {"token_ids": list(c.token_ids), "text": c.text, "logprobs": c.logprobs, "finish_reason": c.finish_reason}


def completion_from_json(d: dict[str, Any]) -> Completion:
    return Completion(token_ids=list(d["token_ids"]), text=d["text"], logprobs=d["logprobs"],
                      finish_reason=d["finish_reason"])


def token_rows(d: Any, key: str) -> list[list[int]]:
    """``d[key]`` as a list of lists of ints, or ValueError naming the key and row."""
    rows = d.get(key) if isinstance(d, dict) else None
    if not isinstance(rows, list):
        raise TypeError(f"request field {key!r} must be a list of token-id lists")
    for i, row in enumerate(rows):
        if not isinstance(row, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in row):
            raise ValueError(f"request field {key!r}: row {i} is not a list of ints")
    return rows
