"""A small transformers-based rollout engine: the fallback where vLLM cannot be installed.

Same protocol as :class:`~megatron_ghpo.rollout.vllm_engine.VLLMEngine` (including streaming and
:meth:`score_tokens`), same log-prob definition (the sampling distribution after temperature and
top-k/top-p; ``log_softmax(logits)`` for greedy rows), same seed rule. It is slow (no paged KV
cache, no continuous batching): meant for tests and small CPU runs. Sampling uses per-completion
``torch.Generator`` objects, never torch's global RNG. ``sleep``/``wake`` are no-ops.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Self

import torch

from megatron_ghpo.logging_utils import get_logger
from megatron_ghpo.records import Completion
from megatron_ghpo.rollout.base import SamplingParams
from megatron_ghpo.rollout.common import (
    completion_seed,
    read_model_config,
    validate_sampling,
    validate_token_rows,
)
from megatron_ghpo.rollout.hf_sampling import sample_rows
from megatron_ghpo.rollout.weights import WeightStream

logger = get_logger("rollout.hf")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}



def _per_expert_slices(state: dict[str, torch.Tensor]) -> dict[str, tuple[str, tuple]]:
    """Checkpoint names of per-expert weights -> (fused parameter, index) for transformers' fused MoE
    experts (``...mlp.experts.gate_up_proj`` [E, 2I, H] = gate rows then up rows of each expert,
    ``...mlp.experts.down_proj`` [E, H, I]), so updates named as in the checkpoint and the weight bridge
    (``...mlp.experts.<e>.gate_proj.weight``) land in the in-memory layout."""
    out: dict[str, tuple[str, tuple]] = {}
    for name, t in state.items():
        if name.endswith(".experts.gate_up_proj") and t.dim() == 3:
            base, inter = name[: -len("gate_up_proj")], t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{base}{e}.gate_proj.weight"] = (name, (e, slice(0, inter)))
                out[f"{base}{e}.up_proj.weight"] = (name, (e, slice(inter, 2 * inter)))
        elif name.endswith(".experts.down_proj") and t.dim() == 3:
            base = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{base}{e}.down_proj.weight"] = (name, (e,))
    return out

class HFEngine:
    """:class:`~megatron_ghpo.rollout.base.StreamingRolloutEngine` on a transformers model."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        dtype: str = "float32",
        max_model_len: int = 2048,
        seed: int = 0,
        device: str = "cpu",
        strict_weights: bool = True,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        config = read_model_config(model_dir)
        if dtype not in _DTYPES:
            raise ValueError(f"rollout dtype={dtype!r}: expected one of {sorted(_DTYPES)}")
        if max_model_len < 2:
            raise ValueError(f"rollout max_model_len={max_model_len}: must be >= 2")
        self.model_dir, self.max_model_len = str(model_dir), max_model_len
        self._model = (
            AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=_DTYPES[dtype]).to(device).eval()
        )
        self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self._vocab_size = int(config["vocab_size"])
        eos = self._model.generation_config.eos_token_id
        eos = eos if eos is not None else self._tokenizer.eos_token_id
        self._eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        pad = self._tokenizer.pad_token_id
        self._pad_id = int(pad if pad is not None else next(iter(self._eos_ids), 0))
        self._rng = torch.Generator().manual_seed(seed)
        self._strict = strict_weights
        state = self._model.state_dict()
        self._expert_slices = _per_expert_slices(state)
        fused = {target for target, _ in self._expert_slices.values()}
        self._required = ({n for n, _ in self._model.named_parameters()} - fused) | set(self._expert_slices)
        self._allowed = (set(state) - fused) | set(self._expert_slices)
        self._queue: dict[str, tuple[list[int], SamplingParams]] = {}
        self._done: dict[str, list[Completion]] = {}
        self._version = 0
        self._closed = False

    @property
    def weight_version(self) -> int:
        return self._version

    @torch.inference_mode()
    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> list[list[Completion]]:
        """``sampling.n`` completions per prompt, in prompt order; seeds as in VLLMEngine."""
        self._check_open()
        validate_sampling(sampling)
        rows = validate_token_rows(
            prompt_token_ids, vocab_size=self._vocab_size, max_len=self.max_model_len - 1
        )
        if not rows:
            return []
        n = sampling.n
        expanded = [row for row in rows for _ in range(n)]
        seeds = [completion_seed(sampling.seed, i, n) for i in range(len(rows))]
        generators = [
            self._rng if s is None else torch.Generator().manual_seed(s + j) for s in seeds for j in range(n)
        ]
        stops = sampling.stop

        def find_stop(tokens: list[int]) -> int | None:
            text = self._decode(tokens)
            hits = [text.find(s) for s in stops if s in text]
            return min(hits) if hits else None

        results = sample_rows(
            self._model, expanded, temperature=sampling.temperature, top_k=sampling.top_k,
            top_p=sampling.top_p, max_new_tokens=[min(sampling.max_tokens, self.max_model_len - len(r)) for r in expanded],
            eos_ids=self._eos_ids, pad_id=self._pad_id, generators=generators,
            find_stop=find_stop if stops else None,
        )  # fmt: skip
        completions = []
        for res in results:
            text = self._decode(res.token_ids)
            completions.append(
                Completion(
                    token_ids=res.token_ids,
                    text=text if res.stop_at is None else text[: res.stop_at],
                    logprobs=res.logprobs if sampling.logprobs else None,
                    finish_reason=res.finish_reason,
                )
            )
        return [completions[i * n : (i + 1) * n] for i in range(len(rows))]

    def submit(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams) -> None:
        """Queue one prompt; queued prompts run at the next :meth:`poll`."""
        self._check_open()
        validate_sampling(sampling)
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"submit: request_id must be a non-empty str, got {request_id!r}")
        if request_id in self._queue or request_id in self._done:
            raise ValueError(f"submit: request_id {request_id!r} is already pending; ids must be unique")
        (row,) = validate_token_rows(
            [prompt_token_ids], vocab_size=self._vocab_size, max_len=self.max_model_len - 1
        )
        self._queue[request_id] = (row, sampling)

    def poll(self) -> list[tuple[str, list[Completion]]]:
        """Run every queued request (one batch per distinct sampling setting) and return them all."""
        self._check_open()
        queued, self._queue = self._queue, {}
        by_params: dict[SamplingParams, list[str]] = {}
        for rid, (_, sp) in queued.items():
            by_params.setdefault(sp, []).append(rid)
        for sp, rids in by_params.items():
            if sp.seed is None:
                outs = self.generate([queued[r][0] for r in rids], sp)
            else:  # a submitted request's seed belongs to it alone (no per-batch offset)
                outs = [self.generate([queued[r][0]], sp)[0] for r in rids]
            self._done.update(zip(rids, outs, strict=True))
        done, self._done = list(self._done.items()), {}
        return done

    def has_pending(self) -> bool:
        return bool(self._queue or self._done)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the model in place (lazily, one at a time); bump the version."""
        self._check_open()
        if self._queue:
            raise RuntimeError(f"load_weights with {len(self._queue)} queued requests: poll() them first")
        state = self._model.state_dict()
        stream = WeightStream(
            weights, required=self._required if self._strict else set(), allowed=self._allowed
        )
        for name, tensor in stream:
            if name in self._expert_slices:
                fused_name, index = self._expert_slices[name]
                target = state[fused_name][index]
            else:
                target = state[name]
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"load_weights: {name!r} has shape {tuple(tensor.shape)}, model has {tuple(target.shape)}"
                )
            target.copy_(tensor.to(device=target.device, dtype=target.dtype))
        stream.check_complete()
        self._version += 1

    @torch.inference_mode()
    def score_tokens(self, token_ids_list: list[list[int]]) -> list[list[float]]:
        """Log-prob of every token after the first given its prefix, at temperature 1."""
        self._check_open()
        rows = validate_token_rows(
            token_ids_list,
            vocab_size=self._vocab_size,
            max_len=self.max_model_len,
            what="sequence",
            min_len=2,
        )
        device = next(self._model.parameters()).device
        scores = []
        for row in rows:  # one at a time: no padding to reason about, and this engine is for small runs
            ids = torch.tensor([row], device=device)
            logp = torch.log_softmax(self._model(input_ids=ids).logits[0, :-1].float(), -1)
            scores.append(logp.gather(-1, ids[0, 1:, None])[:, 0].tolist())
        return scores

    def sleep(self) -> None:
        """No-op: this engine keeps its model resident."""

    def wake(self) -> None:
        """No-op (see :meth:`sleep`)."""

    def close(self) -> None:
        self._closed = True
        self._queue.clear()
        self._done.clear()
        self._model = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the rollout engine is closed")

    def _decode(self, tokens: list[int]) -> str:
        return self._tokenizer.decode(tokens, skip_special_tokens=True)
