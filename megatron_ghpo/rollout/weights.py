"""A checked, lazy pass over the ``(hf_name, tensor)`` pairs a weight sync feeds to an engine."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator

import torch


class WeightStream:
    """Wraps the bridge's iterator: yields its pairs one by one (nothing is materialised) while
    checking each name against the model's tensor names; :meth:`check_complete` afterwards raises
    if a required tensor never came.

    ``required``: names that must appear (a full update); ``allowed``: every acceptable name
    (``required`` plus optional ones such as ``lm_head.weight`` of a tied model).
    """

    def __init__(self, weights: Iterable[tuple[str, torch.Tensor]], *, required: set[str], allowed: set[str]):
        if isinstance(weights, dict):
            raise TypeError(
                "load_weights takes an iterable of (hf_name, tensor) pairs, not a dict: pass state_dict.items()"
            )
        self._weights = weights
        self._required = required
        self._allowed = allowed | required
        self.seen: set[str] = set()
        self.num_bytes = 0

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for item in self._weights:
            if not (isinstance(item, tuple) and len(item) == 2):
                raise TypeError(f"load_weights expects (hf_name, tensor) pairs, got {type(item).__name__}")
            name, tensor = item
            if name not in self._allowed:
                close = difflib.get_close_matches(name, sorted(self._allowed), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(
                    f"load_weights got tensor {name!r}, which the rollout model does not have{hint}; "
                    "names must be Hugging Face checkpoint names of the engine's model"
                )
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(
                    f"load_weights: {name!r} is a {type(tensor).__name__}, expected a torch.Tensor"
                )
            if name in self.seen:
                raise ValueError(f"load_weights got tensor {name!r} twice in one update")
            self.seen.add(name)
            self.num_bytes += tensor.numel() * tensor.element_size()
            yield name, tensor

    def check_complete(self) -> None:
        """Raise ValueError listing required tensors the update did not contain."""
        missing = sorted(self._required - self.seen)
        if missing:
            shown = ", ".join(missing[:8]) + (f" ... ({len(missing)} in all)" if len(missing) > 8 else "")
            raise ValueError(
                f"load_weights: the update lacks {len(missing)} of the model's tensors: {shown}; "
                "a weight sync must export every tensor of the model"
            )
