"""Optimizer-state fixes around Megatron's distributed checkpoints with torch's ``Adam``.

Without apex or Transformer Engine (always the case on CPU) Megatron-Core falls back to
``torch.optim.Adam``, which creates its state lazily and keeps a per-parameter ``step``; the
distributed optimizer's checkpoint code expects FusedAdam's layout (``step`` in the param groups).
The two helpers here bridge that; see also ``cpu_compat.apply_torch_adam_checkpoint_fix``.
"""

from __future__ import annotations

from typing import Any

import torch


def materialize_optimizer_state(optimizer) -> None:
    """Create Adam state for parameters that have none yet (saving before the first step, or loading
    into a fresh optimizer: Megatron's state dict needs a ``step`` entry either way).

    Zero moments and ``step = 0`` are exactly what ``torch.optim.Adam`` creates lazily on its first
    step, so the saved-then-loaded optimizer behaves like a fresh one.
    """
    for leaf in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        inner = leaf.optimizer
        if all(len(inner.state[p]) > 0 for g in inner.param_groups for p in g["params"]):
            continue
        if leaf.init_state_fn is None:
            raise NotImplementedError(f"saving {type(inner).__name__} state before its first step")
        leaf.init_state_fn(inner, leaf.config)
        for g in inner.param_groups:
            for p in g["params"]:
                inner.state[p].setdefault("step", torch.tensor(0.0, dtype=torch.float32))


def restore_adam_steps(optimizer, loaded: dict[str, Any]) -> None:
    """Put back torch Adam's per-parameter ``step`` after a distributed-optimizer load.

    Megatron-Core 0.16.1 without apex/Transformer Engine (torch ``Adam``): the step count is saved in
    the param groups, but ``load_parameter_state_from_dp_reshardable`` then copies the *current*
    (fresh, 0) per-parameter step over the restored one, so the first resumed update uses the
    bias correction of step 1 and differs from the uninterrupted run. Re-applied here from the saved
    param groups; a no-op where the steps already agree (e.g. FusedAdam with TE, which keeps the
    step in the param groups only).
    """
    leaves = list(getattr(optimizer, "chained_optimizers", None) or [optimizer])
    per_leaf = [loaded] if len(leaves) == 1 else [v for _k, v in sorted(loaded.items())]
    for leaf, sd in zip(leaves, per_leaf):
        groups = (sd.get("optimizer") or {}).get("param_groups") if isinstance(sd, dict) else None
        steps = {g["step"] for g in groups or [] if "step" in g}
        if len(steps) != 1:
            continue
        step = float(steps.pop())
        for group in leaf.optimizer.param_groups:
            for p in group["params"]:
                state = leaf.optimizer.state.get(p)
                if state and "step" in state:
                    state["step"] = torch.tensor(step, dtype=torch.float32)
