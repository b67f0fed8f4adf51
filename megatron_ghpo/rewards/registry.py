"""Reward functions by name: the built-in registry plus user functions by dotted path."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from typing import Any

from megatron_ghpo.rewards.functions import (
    RewardFunc,
    accuracy_reward,
    format_reward,
    get_cosine_scaled_reward,
    get_soft_overlong_punishment,
    len_reward,
    reasoning_steps_reward,
    tag_count_reward,
)

REWARD_OPTIONS: dict[str, Any] = {
    "cosine_min_value_wrong": -1.0,
    "cosine_max_value_wrong": -0.5,
    "cosine_min_value_correct": 0.5,
    "cosine_max_value_correct": 1.0,
    "cosine_max_len": 1000,
    "max_completion_len": None,
    "soft_punish_cache": None,
}
"""Options :func:`get_reward_funcs` accepts, with their defaults (open-r1's names)."""


def _cosine(o: dict[str, Any]) -> RewardFunc:
    return get_cosine_scaled_reward(
        min_value_wrong=o["cosine_min_value_wrong"],
        max_value_wrong=o["cosine_max_value_wrong"],
        min_value_correct=o["cosine_min_value_correct"],
        max_value_correct=o["cosine_max_value_correct"],
        max_len=o["cosine_max_len"],
    )


def _soft_overlong(o: dict[str, Any]) -> RewardFunc:
    if o["max_completion_len"] is None or o["soft_punish_cache"] is None:
        raise ValueError(
            "reward 'soft_overlong' needs max_completion_len and soft_punish_cache "
            "(e.g. rewards.max_completion_len: 2048, rewards.soft_punish_cache: 256)"
        )
    return get_soft_overlong_punishment(o["max_completion_len"], o["soft_punish_cache"])


REGISTRY: dict[str, Callable[[dict[str, Any]], RewardFunc]] = {
    "accuracy": lambda o: accuracy_reward,
    "format": lambda o: format_reward,
    "tag_count": lambda o: tag_count_reward,
    "reasoning_steps": lambda o: reasoning_steps_reward,
    "cosine": _cosine,
    "length": lambda o: len_reward,
    "soft_overlong": _soft_overlong,
}
"""Built-in reward names -> factory taking the resolved options."""


def reward_name(fn: Callable[..., Any]) -> str:
    """The name a reward function is logged and looked up under (``reward/<name>``)."""
    name = getattr(fn, "reward_name", None) or getattr(fn, "__name__", None)
    if not name:
        raise ValueError(f"reward function {fn!r} has no __name__; set a reward_name attribute on it")
    return str(name)


def _load_dotted(path: str) -> RewardFunc:
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"reward {path!r}: a custom reward is given as 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"reward {path!r}: cannot import module {module_name!r} ({exc})") from exc
    fn = getattr(module, attr, None)
    if fn is None:
        raise ValueError(f"reward {path!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise TypeError(f"reward {path!r}: {attr!r} is a {type(fn).__name__}, not a callable")
    return fn


def get_reward_funcs(names: list[str], **options: Any) -> list[RewardFunc]:
    """Resolve reward names (registry names or ``package.module:function`` paths) to callables.

    Options are listed in :data:`REWARD_OPTIONS`; an unknown option or name is an error naming the
    nearest valid one.
    """
    unknown = sorted(set(options) - set(REWARD_OPTIONS))
    if unknown:
        hints = [difflib.get_close_matches(k, list(REWARD_OPTIONS), n=1) for k in unknown]
        detail = ", ".join(
            f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in zip(unknown, hints)
        )
        raise ValueError(f"unknown reward option(s) {detail}; valid options: {sorted(REWARD_OPTIONS)}")
    if isinstance(names, str):
        raise TypeError(f"reward names must be a list of str, got the string {names!r}; write [{names!r}]")
    resolved = {**REWARD_OPTIONS, **options}
    funcs = []
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"reward names must be strings, got {name!r} ({type(name).__name__})")
        if not name:
            raise ValueError("reward names must be non-empty strings, got ''")
        if name in REGISTRY:
            funcs.append(REGISTRY[name](resolved))
        elif ":" in name or "." in name:
            funcs.append(_load_dotted(name))
        else:
            close = difflib.get_close_matches(name, list(REGISTRY), n=1, cutoff=0.0)
            raise ValueError(
                f"unknown reward function {name!r}; did you mean {close[0]!r}? Built-in rewards: "
                f"{sorted(REGISTRY)}; a custom one is given as 'package.module:function'"
            )
    return funcs
