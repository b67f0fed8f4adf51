"""``MegatronPolicy``: the trainer's handle on a TP x PP x DP Megatron-Core GPT model.

Every rank constructs it and calls every method together (they run collectives). Each
data-parallel replica passes its own ``TrainBatch``; all ranks of one replica (its TP and PP
ranks) must pass the same one.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from megatron_ghpo.logging_utils import get_logger
from megatron_ghpo.policy.batching import make_micro_batches, validate_samples
from megatron_ghpo.policy.hf_arch import hf_arch, load_hf_config
from megatron_ghpo.policy.io import PolicyIO
from megatron_ghpo.policy.optimizer import OptimizerOptions, current_lr, guarded_step
from megatron_ghpo.policy.options import AlgorithmOptions, BatchingOptions, ModelOptions, ParallelOptions
from megatron_ghpo.policy.step import LossSpec, reduce_reports, run_schedule, step_metrics
from megatron_ghpo.records import TrainBatch, TrainSample

logger = get_logger(__name__)


class MegatronPolicy(PolicyIO):
    """Policy model + optimizer + schedule, built from an HF folder/config; see the module docstring.

    Initial weights, in order of precedence: ``init_checkpoint`` (a Megatron checkpoint, e.g. from
    ``megatron-ghpo convert hf-to-megatron``), the ``*.safetensors`` of an HF folder ``source``
    (through the weight bridge), or random initialisation when ``random_init=True``. With
    ``algorithm.beta > 0`` a frozen reference model keeps these initial weights.
    ``train=False`` builds the model only (no DDP wrapper, optimizer or reference model).
    """

    def __init__(
        self,
        source: Any,
        *,
        parallel: ParallelOptions | None = None,
        model: ModelOptions | None = None,
        optimizer: OptimizerOptions | None = None,
        algorithm: AlgorithmOptions | None = None,
        batching: BatchingOptions | None = None,
        init_checkpoint: str | Path | None = None,
        random_init: bool = False,
        train: bool = True,
    ) -> None:
        from megatron_ghpo.policy.checkpoint import load_checkpoint, read_checkpoint_metadata
        from megatron_ghpo.policy.model import build_gpt_model, padded_vocab_size
        from megatron_ghpo.policy.parallel import check_parallel_sizes, init_parallel
        from megatron_ghpo.policy.wrap import build_reference, wrap_for_training

        self.parallel_options = parallel or ParallelOptions()
        self.model_options = model or ModelOptions()
        self.optimizer_options = optimizer or OptimizerOptions()
        self.algorithm = algorithm or AlgorithmOptions()
        self.batching = batching or BatchingOptions()
        self.source = source
        self.hf_config = load_hf_config(source)
        self.arch = hf_arch(self.hf_config)
        p = self.parallel_options
        self.layout = init_parallel(
            tensor_model_parallel_size=p.tensor_model_parallel_size,
            pipeline_model_parallel_size=p.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
            expert_model_parallel_size=p.expert_model_parallel_size,
            expert_tensor_parallel_size=p.expert_tensor_parallel_size,
            sequence_parallel=p.sequence_parallel,
            seed=p.seed,
            timeout_s=p.timeout_s,
        )
        a, lay = self.arch, self.layout
        check_parallel_sizes(lay.world_size, lay.tp, lay.pp, a.num_heads, a.num_kv_heads, a.num_layers, vpp=lay.vpp)
        init_meta = read_checkpoint_metadata(init_checkpoint) if init_checkpoint is not None else None
        m = self.model_options
        self.vocab_size = (
            init_meta["vocab_size"] if init_meta else padded_vocab_size(a.vocab_size, m.make_vocab_size_divisible_by, lay.tp)
        )
        build = {
            "bf16": m.bf16, "transformer_impl": m.transformer_impl, "fp8": m.fp8, "fp8_recipe": m.fp8_recipe,
            "recompute": m.recompute, "vocab_size": self.vocab_size,
        }  # fmt: skip
        chunks = build_gpt_model(self.hf_config, **build)
        self.optimizer = self.scheduler = None
        if train:
            chunks, self.optimizer, self.scheduler = wrap_for_training(chunks, self.optimizer_options, m.params_dtype)
        self.chunks = chunks
        if init_checkpoint is not None:
            load_checkpoint(init_checkpoint, chunks, optimizer=self.optimizer, load_optimizer=False)
        elif self._hf_weights_present():
            self._import_hf_weights()
        elif not random_init:
            raise ValueError(
                f"no initial weights: {source!r} is not a folder with *.safetensors; pass init_checkpoint=<megatron "
                "checkpoint> or random_init=True"
            )
        self.reference = None
        if train and self.algorithm.beta > 0:
            self.reference = build_reference(self.hf_config, self.model_chunks, build)
        self.iteration = 0
        self.skipped_steps = 0

    @classmethod
    def from_config(
        cls, cfg: Any, *, model_dir: str | Path, mode: str = "rl", total_steps: int | None = None
    ) -> MegatronPolicy:
        """Build from the project config: ``model_dir`` is an HF folder or a ``convert hf-to-megatron``
        checkpoint; ``mode`` ``rl`` or ``sft`` (no reference model); ``total_steps`` sizes the LR schedule
        (optional when ``training.max_steps`` is set or the schedule is constant)."""
        from megatron_ghpo.policy.from_config import policy_kwargs, weights_source

        if mode not in ("rl", "sft"):
            raise ValueError(f"mode must be 'rl' or 'sft', got {mode!r}")
        return cls(**weights_source(model_dir), **policy_kwargs(cfg, total_steps=total_steps, mode=mode))

    # ----------------------------------------------------------------------------- model access
    @property
    def model_chunks(self) -> list:
        """This rank's ``GPTModel`` chunks, unwrapped (for the weight bridge's export)."""
        from megatron_ghpo.policy.checkpoint import _unwrap

        return [_unwrap(c) for c in self.chunks]

    @property
    def rank(self) -> int:
        return self.layout.rank

    def replica_ranks(self) -> list[list[int]]:
        """Global ranks of each data-parallel replica (its TP x PP ranks), indexed by DP rank."""
        gathered: list[Any] = [None] * self.layout.world_size
        torch.distributed.all_gather_object(gathered, (self.layout.dp_rank, self.layout.rank))
        out: list[list[int]] = [[] for _ in range(self.layout.dp)]
        for dp_rank, rank in gathered:
            out[dp_rank].append(rank)
        return [sorted(r) for r in out]

    def learning_rate(self) -> float:
        if self.optimizer is None:
            raise RuntimeError("this policy was built with train=False: it has no optimizer")
        return current_lr(self.optimizer)

    def _hf_weights_present(self) -> bool:
        return isinstance(self.source, (str, Path)) and Path(self.source).is_dir() and any(Path(self.source).glob("*.safetensors"))

    def _import_hf_weights(self) -> None:
        from megatron_ghpo.policy.wrap import import_hf_weights

        import_hf_weights(self.model_chunks, self.source, self.hf_config)
        if self.optimizer is not None:
            self.optimizer.reload_model_params()

    # ----------------------------------------------------------------------------- batches
    def _micro_batches(self, samples: list[TrainSample], loss_weights: torch.Tensor | None = None):
        validate_samples(samples, vocab_size=self.arch.vocab_size, max_length=self.arch.max_position_embeddings)
        self._check_same_batch(samples)
        b = self.batching
        if b.max_tokens_per_micro_batch is not None and self.chunks[0].config.transformer_impl == "transformer_engine":
            raise NotImplementedError(
                "sequence packing with the Transformer Engine layer spec (needs PackedSeqParams/THD); "
                "use padding (max_tokens_per_micro_batch: null) or transformer_impl: local"
            )
        if b.share_prompts and self.chunks[0].config.transformer_impl == "transformer_engine":
            raise NotImplementedError(
                "shared-prompt rows with the Transformer Engine layer spec (its fused attention takes no arbitrary "
                "mask); set training.share_prompts: false or transformer_impl: local"
            )
        if b.share_prompts and self.layout.sequence_parallel:
            raise NotImplementedError("shared-prompt rows with sequence parallelism; set training.share_prompts: false")
        return make_micro_batches(
            samples, micro_batch_size=b.micro_batch_size, max_tokens_per_micro_batch=b.max_tokens_per_micro_batch,
            pad_token_id=b.pad_token_id, uniform_shape=self.layout.vpp is not None,
            pad_to_multiple_of=math.lcm(16 if self.model_options.fp8 else 1, self.layout.tp if self.layout.sequence_parallel else 1),
            group_by_length=b.group_by_length, share_prompts=b.share_prompts, max_row_tokens=b.shared_row_tokens,
            loss_weights=loss_weights,
        )  # fmt: skip

    def _check_same_batch(self, samples: list[TrainSample]) -> None:
        """All ranks of one data-parallel replica must train on the same samples (cheap fingerprint)."""
        from megatron.core import parallel_state

        if self.layout.tp * self.layout.pp == 1:
            return
        ids = [t for s in samples for t in (*s.prompt_ids, -1, *s.completion_ids, -2)]
        fp = [len(samples), len(ids), sum(ids), sum(i * t for i, t in enumerate(ids, 1)) % 1_000_003]
        t = torch.tensor(fp + [-x for x in fp], dtype=torch.float64, device=self.layout.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=parallel_state.get_model_parallel_group())
        if not torch.equal(t[: len(fp)], -t[len(fp) :]):
            raise ValueError(
                f"rank {self.layout.rank}: the TP/PP ranks of data-parallel replica {self.layout.dp_rank} received different "
                "TrainBatches; every rank of a replica must pass the same batch (broadcast it from the replica's leader)"
            )

    def _loss_weights(self, samples: list[TrainSample], mode: str) -> torch.Tensor:
        """Per-sequence loss weights from counts over the whole step (one all-reduce over DP), so the
        step loss and gradient do not depend on how sequences are laid out in micro-batches."""
        from megatron.core import parallel_state

        from megatron_ghpo.algo.losses import StepCounts, sequence_loss_weights, step_counts

        a = self.algorithm
        loss_type = "dapo" if mode == "sft" else a.loss_type  # SFT: the token mean over the step
        counts = [float(sum(s.completion_mask)) for s in samples]
        local = step_counts(counts, unit_size=a.loss_unit_size)
        t = torch.tensor(local.as_list(), dtype=torch.float64, device=self.layout.device)
        torch.distributed.all_reduce(t, group=parallel_state.get_data_parallel_group())
        totals = StepCounts(*t.tolist())
        return sequence_loss_weights(counts, loss_type=loss_type, totals=totals, unit_size=a.loss_unit_size,
                                     max_completion_length=a.max_completion_length)

    def compute_logprobs(self, batch: TrainBatch, *, temperature: float | None = None, reference: bool = False, entropy: bool = False):
        """Per-sample log-probs of each completion token under the current (or reference) model.

        ``temperature`` defaults to the algorithm's. Returns ``list[list[float]]`` in sample order,
        or ``(logprobs, entropies)`` when ``entropy=True``. Identical on every rank of the replica.
        """
        from megatron_ghpo.policy.forward import batch_logprobs

        chunks = self.chunks if not reference else self.reference
        if chunks is None:
            raise RuntimeError("no reference model: it exists only when algorithm.beta > 0")
        spec = LossSpec(mode="logprobs", algorithm=self.algorithm, temperature=temperature or self.algorithm.temperature,
                        vocab_size=self.arch.vocab_size, with_entropy=entropy)
        samples = [TrainSample(**{**s.__dict__, "old_logprobs": None, "ref_logprobs": None}) for s in batch.samples]
        mbs = self._micro_batches(samples)
        lengths = [len(s.completion_ids) for s in samples]
        lp, ent = batch_logprobs(chunks, mbs, spec, num_samples=len(samples), lengths=lengths, device=self.layout.device)
        return (lp, ent) if entropy else lp

    # ----------------------------------------------------------------------------- training
    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer step of the GHPO/GRPO loss on ``batch`` (this replica's share).

        Samples without ``old_logprobs`` are trained on-policy (ratio ≡ 1); with ``beta > 0``,
        missing ``ref_logprobs`` are computed with the frozen reference model."""
        return self._step(list(batch.samples), mode="policy")

    def _with_reference(self, samples: list[TrainSample]) -> list[TrainSample]:
        if self.algorithm.beta <= 0 or all(s.ref_logprobs is not None for s in samples):
            return samples
        ref = self.compute_logprobs(TrainBatch(samples=samples), reference=True)
        return [TrainSample(**{**s.__dict__, "ref_logprobs": r}) for s, r in zip(samples, ref)]

    def sft_step(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer step of cross-entropy on the completion tokens where ``completion_mask`` is 1
        (the worked solution), averaged over those tokens of the global batch. Advantages are ignored."""
        return self._step(list(batch.samples), mode="sft")

    def _step(self, samples: list[TrainSample], *, mode: str) -> dict[str, float]:
        t0 = time.perf_counter()
        report = self.forward_backward(samples, mode=mode)
        return self.apply_update(report, mode=mode, started=t0)

    def forward_backward(self, samples: list[TrainSample], *, mode: str = "policy") -> dict[str, float]:
        """Forward and backward over all micro-batches; gradients are left reduced in the DDP buffers.

        Returns the reduced loss report (identical on every rank). :meth:`train_step` is this
        followed by :meth:`apply_update`; the split exists for inspection (tests, debugging).
        """
        if self.optimizer is None:
            raise RuntimeError("this policy was built with train=False: it cannot train")
        if mode == "policy":
            samples = self._with_reference(samples)
        mbs = self._micro_batches(samples, loss_weights=self._loss_weights(samples, mode))
        lay = self.layout
        if lay.vpp and len(mbs) % lay.pp:
            raise ValueError(
                f"the interleaved (virtual pipeline) schedule needs a multiple of PP={lay.pp} micro-batches per step, got "
                f"{len(mbs)} ({len(samples)} sequences, micro_batch_size={self.batching.micro_batch_size}); change the batch "
                "or micro-batch size, or disable virtual_pipeline_model_parallel_size"
            )
        spec = LossSpec(
            mode=mode, algorithm=self.algorithm, vocab_size=self.arch.vocab_size,
            temperature=1.0 if mode == "sft" else self.algorithm.temperature,  # SFT: plain cross-entropy
            loss_scale=float(len(mbs) * self.layout.dp), with_entropy=self.algorithm.compute_entropy,
        )  # fmt: skip
        for c in self.chunks:
            c.train()
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        reports = run_schedule(self.chunks, mbs, spec, forward_only=False, device=self.layout.device)
        out = reduce_reports(reports, mode, device=self.layout.device)
        # this replica's model input: real tokens (prompts included) and the padded [R, S] total
        out["input_tokens"] = float(sum(mb.real_tokens for mb in mbs))
        out["padded_tokens"] = float(sum(mb.num_tokens for mb in mbs))
        return out

    def apply_update(self, report: dict[str, float], *, mode: str = "policy", started: float | None = None) -> dict[str, float]:
        """Optimizer step from the gradients of :meth:`forward_backward`, skipped (and counted) when the
        loss or gradient norm is not finite. Returns the step's metrics."""
        updated, grad_norm = guarded_step(self.optimizer, self.scheduler, loss_finite=math.isfinite(report["loss"]),
                                          clip_grad=self.optimizer_options.clip_grad)  # fmt: skip
        if updated:
            self.iteration += 1
        else:
            self.skipped_steps += 1
        seconds = time.perf_counter() - started if started is not None else 0.0
        return step_metrics(report, mode=mode, grad_norm=grad_norm, updated=updated, seconds=seconds,
                            skipped_steps=self.skipped_steps, algorithm=self.algorithm)  # fmt: skip

    def close(self, *, destroy_process_group: bool = True) -> None:
        """Release Megatron's process groups (and the default group, if ``init_parallel`` created it and
        ``destroy_process_group``; keep it to build another layout in the same processes)."""
        from megatron_ghpo.policy.parallel import destroy_parallel

        destroy_parallel(destroy_process_group=destroy_process_group)
