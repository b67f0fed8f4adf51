"""YAML loading for :class:`megatron_ghpo.config.Config`: flat seed keys, nested sections, typed
``--set`` overrides, "did you mean" for unknown keys, and a resolved-config writer."""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from megatron_ghpo.config import SECTIONS, Config, ConfigError
from megatron_ghpo.logging_utils import get_logger

logger = get_logger("config")

IGNORED_KEYS: dict[str, str] = {
    "vllm_device": "the rollout engine is colocated with the trainer (or a rollout server); no device to pick",
    "hub_strategy": "nothing is pushed to the Hugging Face hub",
    "push_to_hub": "nothing is pushed to the Hugging Face hub",
    "hub_model_id": "nothing is pushed to the Hugging Face hub",
    "hub_private_repo": "nothing is pushed to the Hugging Face hub",
    "attn_implementation": "attention kernels come from the Megatron layer spec (Transformer Engine or local)",
    "model_revision": "models are read from local folders; pick the revision when downloading",
    "gradient_checkpointing_kwargs": "Megatron recompute has no reentrant switch; gradient_checkpointing is honoured",
    "per_device_eval_batch_size": "evaluation batches are scheduled by the rollout engine",
    "use_liger_kernel": "kernels come from the Megatron layer spec",
}
"""Keys the original recipe accepts that mean nothing here: loaded with one warning each."""

# The seed recipe writes scale_rewards as a boolean.
_BOOL_ALIASES = {"scale_rewards": {True: "group", False: "none"}}


def _field_index() -> dict[str, tuple[str, dataclasses.Field]]:
    index: dict[str, tuple[str, dataclasses.Field]] = {}
    for section, factory in SECTIONS.items():
        for f in dataclasses.fields(factory()):
            if f.name in index:  # guarded by a unit test; unique leaves are what make flat keys work
                raise RuntimeError(f"config field {f.name!r} appears in two sections")
            index[f.name] = (section, f)
    return index


FIELDS = _field_index()


def _type_hints() -> dict[str, Any]:
    hints: dict[str, Any] = {}
    for factory in SECTIONS.values():
        hints.update(typing.get_type_hints(factory))
    return hints


_HINTS = _type_hints()


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats. Raises ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[-1] if errors else f"{key}={value!r}: wrong type")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value is False and "no" in choices:  # YAML 1.1 reads an unquoted `no` as false
            return "no"
        if value in choices and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: must be one of {list(choices)}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r}: must be a list (YAML `[a, b]` or one item per line)")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: must be true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: must be an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}={value!r}: must be a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}={value!r}: must be a string (quote it in YAML)")
    raise ConfigError(f"{key}: unsupported annotation {tp}")


def _unknown_key_error(key: str, where: str) -> ConfigError:
    candidates = list(FIELDS) + list(SECTIONS) + list(IGNORED_KEYS)
    near = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    hint = f'; did you mean {near[0]}?' if near else "; see `megatron-ghpo train --help-config` for every key"
    return ConfigError(f"unknown config key {key!r} in {where}{hint}")


def flatten(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """Flat ``{leaf: value}`` from a flat or sectioned mapping; unknown keys raise."""
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key in SECTIONS and isinstance(value, dict):
            for sub, v in value.items():
                if sub not in FIELDS or FIELDS[sub][0] != key:
                    raise _unknown_key_error(sub, f"{where} (section {key})")
                flat[sub] = v
        elif key in FIELDS:
            flat[key] = value
        elif key in IGNORED_KEYS:
            logger.warning("config key %r in %s is ignored: %s", key, where, IGNORED_KEYS[key])
        else:
            raise _unknown_key_error(key, where)
    return flat


def parse_override(item: str) -> tuple[str, Any]:
    """``key=value`` with a YAML-typed value (``lr=1e-5``, ``hint_ladder=[0.3,0.6]``)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value")
    key, text = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: value {text!r} is not valid YAML ({e})") from None
    if isinstance(value, str) and _HINTS.get(key) in (float, float | None):
        try:  # YAML 1.1 reads 1e-5 (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    return key, value


def build_config(flat: dict[str, Any]) -> Config:
    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for key, value in flat.items():
        if key not in FIELDS:
            raise _unknown_key_error(key, "overrides")
        if key in _BOOL_ALIASES and isinstance(value, bool):
            value = _BOOL_ALIASES[key][value]
        section, _ = FIELDS[key]
        sections[section][key] = _coerce(key, value, _HINTS[key])
    return Config(**{name: SECTIONS[name](**kw) for name, kw in sections.items()})


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Load YAML (flat or sectioned), apply ``key=value`` overrides, validate field rules."""
    flat: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of keys, got {type(raw).__name__}")
        flat = flatten(raw, str(p))
    for item in overrides:
        key, value = parse_override(item)
        flat.update(flatten({key: value}, "--set"))
    return build_config(flat)


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config (sectioned YAML that `--config` loads back)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False, width=120))


def read_model_dims(model_name_or_path: str) -> dict | None:
    """Heads, layers and experts from a local model folder's config.json (None when it is not a local folder)."""
    cfg = Path(model_name_or_path) / "config.json"
    if not cfg.is_file():
        return None
    data = json.loads(cfg.read_text())
    dims = {k: data.get(k) for k in ("num_attention_heads", "num_key_value_heads", "num_hidden_layers")}
    dims["num_experts"] = data.get("num_experts") or data.get("num_local_experts")
    return dims
