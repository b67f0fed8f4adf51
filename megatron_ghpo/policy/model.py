"""Model provider: a Megatron-Core ``TransformerConfig`` and ``GPTModel`` chunks from an HF config.

Llama, Qwen2, Qwen3 and Qwen3-MoE families: grouped-query attention, RoPE base θ (and Llama-3
frequency scaling), RMSNorm ε, SwiGLU MLP, Qwen2's q/k/v bias, Qwen3's per-head q/k RMSNorm
(``qk_layernorm``; ``head_dim`` may differ from ``hidden_size / num_attention_heads``), tied or untied
embeddings, vocabulary padded to a multiple of ``make_vocab_size_divisible_by × TP``.

Qwen3-MoE: Megatron's ``MoELayer`` with a softmax top-k router and one SwiGLU MLP per expert
(``SequentialMLP``: works on CPU; grouped GEMM needs a GPU and is not used), the alltoall token
dispatcher (dropless, variable sequence lengths), experts split over the expert-parallel group
(``expert_model_parallel_size``) and, within an expert, over ``expert_tensor_parallel_size`` ranks.
Dense layers of a mixed layout (``mlp_only_layers``, ``decoder_sparse_step``) keep a plain MLP.

``transformer_impl``: ``local`` (Megatron-Core's own PyTorch modules: the CPU path),
``transformer_engine`` (TE fused layers: GPU), ``auto`` (TE when it imports *and* CUDA is present).
``fp8`` (``hybrid`` | ``e4m3``) needs TE on a GPU of compute capability ≥ 8.9.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import torch

from megatron_ghpo.logging_utils import get_logger
from megatron_ghpo.policy.hf_arch import HFArch, MoEArch, hf_arch

logger = get_logger(__name__)

TransformerImpl = Literal["auto", "local", "transformer_engine"]
FP8_FORMATS = ("hybrid", "e4m3")
FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")


def padded_vocab_size(vocab_size: int, divisible_by: int = 128, tp: int = 1) -> int:
    """Smallest multiple of ``divisible_by × tp`` that is ≥ ``vocab_size``."""
    if vocab_size < 1 or divisible_by < 1 or tp < 1:
        raise ValueError(f"padded_vocab_size needs positive sizes, got vocab_size={vocab_size} divisible_by={divisible_by} tp={tp}")
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


@functools.cache
def te_importable() -> bool:
    """True when ``transformer_engine`` imports. Any exception counts as absent: a broken TE raises
    RuntimeError (e.g. ``cudnn shared object not found``), not ImportError."""
    try:
        import transformer_engine
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # noqa: BLE001  (deliberately broad, see docstring)
        logger.debug("transformer_engine unavailable: %s", exc)
        return False
    return True


def resolve_transformer_impl(impl: str) -> Literal["local", "transformer_engine"]:
    """Turn ``auto`` into a concrete implementation; check an explicit TE request is satisfiable."""
    if impl not in ("auto", "local", "transformer_engine"):
        raise ValueError(f"transformer_impl must be 'auto', 'local' or 'transformer_engine', got {impl!r}")
    if impl == "local":
        return "local"
    usable = torch.cuda.is_available() and te_importable()
    if impl == "transformer_engine" and not usable:
        why = "CUDA is not available" if not torch.cuda.is_available() else "transformer_engine does not import"
        raise ValueError(f"transformer_impl='transformer_engine' but {why}; use transformer_impl: local (or auto)")
    return "transformer_engine" if usable else "local"


def _check_fp8(fp8: str | None, impl: str, fp8_recipe: str) -> None:
    if fp8 is None:
        return
    if fp8 not in FP8_FORMATS:
        raise ValueError(f"fp8 must be null, 'hybrid' or 'e4m3', got {fp8!r}")
    if fp8_recipe not in FP8_RECIPES:
        raise ValueError(f"fp8_recipe must be one of {FP8_RECIPES}, got {fp8_recipe!r}")
    if impl != "transformer_engine":
        raise ValueError(f"fp8={fp8!r} needs transformer_impl 'transformer_engine' (resolved to {impl!r}); set fp8: null")
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        raise ValueError(
            f"fp8={fp8!r} needs a GPU with compute capability >= 8.9 (Ada/Hopper or newer); "
            f"this {torch.cuda.get_device_name()} is {major}.{minor}; set fp8: null"
        )


def transformer_config_from_hf(
    hf_config: Any,
    *,
    tp: int = 1,
    pp: int = 1,
    vpp: int | None = None,
    params_dtype: torch.dtype = torch.float32,
    bf16: bool = False,
    transformer_impl: TransformerImpl = "auto",
    fp8: str | None = None,
    fp8_recipe: str = "delayed",
    recompute: bool = False,
    sequence_parallel: bool = False,
    ep: int = 1,
    etp: int | None = None,
    for_training: bool = True,
):
    """A ``TransformerConfig`` reproducing ``hf_config`` at the given TP/PP (and EP/ETP for MoE).

    ``bf16=True`` implies ``params_dtype=torch.bfloat16``. ``recompute=True`` recomputes each
    layer's activations in backward (full, uniform, one layer per checkpoint). Dropout is 0 (RL and
    SFT fine-tuning of these families train without it). ``ep``: expert-parallel size; ``etp``:
    expert tensor-parallel size (None: equal to ``tp``, Megatron's default); both MoE only.
    ``for_training=False`` (export, conversion, forward-only use) lifts the MoE x TP training check.
    """
    from megatron.core.transformer import TransformerConfig

    from megatron_ghpo.policy.parallel import check_parallel_sizes

    arch = hf_arch(hf_config)
    impl = resolve_transformer_impl(transformer_impl)
    _check_fp8(fp8, impl, fp8_recipe)
    if bf16:
        params_dtype = torch.bfloat16
    if params_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"params_dtype must be float32, bfloat16 or float16, got {params_dtype}")
    if sequence_parallel and impl != "transformer_engine":
        raise ValueError("sequence_parallel=True needs the Transformer Engine layer spec (GPU); set it false")
    if vpp == 1:
        vpp = None
    etp = tp if etp is None else etp
    check_parallel_sizes(tp * pp, tp, pp, arch.num_heads, arch.num_kv_heads, arch.num_layers, vpp=vpp)
    check_expert_sizes(arch.moe, ep=ep, etp=etp)
    if arch.moe is not None and for_training and tp > 1 and not sequence_parallel:
        check_moe_training_tp(tp, te=impl == "transformer_engine")
    te = impl == "transformer_engine"
    kwargs: dict[str, Any] = {
        "num_layers": arch.num_layers,
        "hidden_size": arch.hidden_size,
        "ffn_hidden_size": arch.intermediate_size,
        "num_attention_heads": arch.num_heads,
        "num_query_groups": arch.num_kv_heads,
        "kv_channels": arch.head_dim,
        "normalization": "RMSNorm",
        "layernorm_epsilon": arch.rms_norm_eps,
        "gated_linear_unit": True,
        "activation_func": torch.nn.functional.silu,
        "add_bias_linear": False,
        "add_qkv_bias": arch.qkv_bias,
        "qk_layernorm": arch.qk_layernorm,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "init_method_std": arch.initializer_range,
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "virtual_pipeline_model_parallel_size": vpp,
        "sequence_parallel": sequence_parallel,
        "params_dtype": params_dtype,
        "bf16": params_dtype == torch.bfloat16,
        "fp16": params_dtype == torch.float16,
        "pipeline_dtype": params_dtype if pp > 1 else None,
        # Micro-batches are padded to their own longest sequence, so PP stages exchange shapes.
        "variable_seq_lengths": True,
        # The interleaved schedule sends an activation and a gradient to the same peer at once
        # when PP=2 (previous = next stage); batched P2P then pairs them by order and can swap
        # them. Megatron's unbatched path puts the two directions on different groups.
        "batch_p2p_comm": vpp is None,
        # The 'allgather' dispatcher rejects variable_seq_lengths; alltoall is dropless and runs on gloo.
        "moe_token_dispatcher_type": "alltoall",
        "attention_softmax_in_fp32": True,
        # Kernel fusions need CUDA (TE/apex); off on the local path.
        "masked_softmax_fusion": te,
        "bias_activation_fusion": te,
        "bias_dropout_fusion": te,
        "apply_rope_fusion": False,
        "persist_layer_norm": False,
        "gradient_accumulation_fusion": False,
        "cross_entropy_loss_fusion": False,
        "use_cpu_initialization": not torch.cuda.is_available(),
        "transformer_impl": impl,
    }
    if arch.moe is not None:
        kwargs.update(moe_kwargs(arch.moe, ep=ep, etp=etp))
    if fp8 is not None:
        kwargs.update(fp8=fp8, fp8_recipe=fp8_recipe)
    if recompute:
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return TransformerConfig(**kwargs)


def check_expert_sizes(moe: MoEArch | None, *, ep: int, etp: int) -> None:
    """Expert-parallel sizes against the model: EP > 1 (or ETP != TP) needs experts, EP divides them."""
    for name, value in (("expert_model_parallel_size", ep), ("expert_tensor_parallel_size", etp)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if moe is None:
        if ep > 1:
            raise ValueError(
                f"expert_model_parallel_size={ep} needs a mixture-of-experts model (num_experts > 0, e.g. "
                "Qwen3-MoE); this model is dense: set expert_model_parallel_size: 1"
            )
        return
    if moe.num_experts % ep:
        raise ValueError(
            f"expert_model_parallel_size={ep} does not divide num_experts={moe.num_experts}: every expert-parallel "
            "rank holds the same number of experts; use a divisor of num_experts"
        )


def check_moe_training_tp(tp: int, *, te: bool) -> None:
    """Megatron-Core 0.16.1's ``MoELayer.forward`` refuses to train with TP > 1 unless sequence
    parallelism is on (``ValueError: During training, performance may degrade ...``), and sequence
    parallelism needs the Transformer Engine layer spec; say so before any rank builds a model."""
    if te:
        raise ValueError(
            f"a mixture-of-experts model trains at tensor_model_parallel_size={tp} only with sequence_parallel: true "
            "(Megatron-Core's MoELayer requires it); set sequence_parallel: true"
        )
    raise NotImplementedError(
        f"training a mixture-of-experts model at tensor_model_parallel_size={tp} needs sequence_parallel (Megatron-Core "
        "0.16.1's MoELayer refuses TP > 1 without it), and sequence parallelism needs the Transformer Engine layer spec "
        "(GPU). On the local (CPU) path train it at tensor_model_parallel_size: 1 and split the experts with "
        "expert_model_parallel_size; forward-only use (export, conversion, verify) works at any TP"
    )


def moe_kwargs(moe: MoEArch, *, ep: int, etp: int) -> dict[str, Any]:
    """``TransformerConfig`` fields of a Qwen3-MoE block (Megatron-Core 0.16.1 router semantics).

    transformers computes ``softmax(logits)`` over all experts, takes the top k, and with
    ``norm_topk_prob`` divides them by their sum. The renormalised values equal a softmax over the
    k chosen logits, which is Megatron's ``moe_router_pre_softmax=False`` (top-k on the logits, then
    softmax); without renormalisation the full softmax's values are used, which is
    ``moe_router_pre_softmax=True`` (softmax, then top-k). No score scaling, no expert bias, no
    token dropping (capacity factor None), routing in the activations' dtype as transformers does.
    The load-balancing loss is Megatron's per-layer switch loss weighted by ``router_aux_loss_coef``
    (it only adds gradients: logits are unchanged).
    """
    return {
        "num_moe_experts": moe.num_experts,
        "moe_ffn_hidden_size": moe.ffn_hidden_size,
        "moe_router_topk": moe.topk,
        "moe_router_score_function": "softmax",
        "moe_router_pre_softmax": not moe.norm_topk_prob,
        "moe_router_topk_scaling_factor": None,
        "moe_router_load_balancing_type": "aux_loss" if moe.aux_loss_coeff > 0 else "none",
        "moe_aux_loss_coeff": moe.aux_loss_coeff,
        "moe_layer_freq": list(moe.layer_pattern),
        "moe_expert_capacity_factor": None,
        "moe_shared_expert_intermediate_size": None,
        # Grouped GEMM (TE / cutlass kernels) needs a GPU; SequentialMLP runs one MLP per local expert.
        "moe_grouped_gemm": False,
        "moe_permute_fusion": False,
        "moe_router_fusion": False,
        "expert_model_parallel_size": ep,
        "expert_tensor_parallel_size": etp,
    }


def _use_sdpa(layer) -> None:
    from megatron_ghpo.policy.attention import SDPADotProductAttention

    layer.submodules.self_attention.submodules.core_attention = SDPADotProductAttention


def layer_spec(config, *, vp_stage: int | None = None, pp_rank: int | None = None) -> Any:
    """Megatron layer spec for ``config.transformer_impl``: TE fused modules, or local PyTorch ones with
    attention on PyTorch's SDPA kernel (:mod:`megatron_ghpo.policy.attention`).

    Dense models: one layer spec for every layer. MoE models: the block spec of pipeline rank
    ``pp_rank`` (virtual stage ``vp_stage``), one layer spec per layer it builds, MoE or dense as
    ``config.moe_layer_freq`` says.
    """
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_block_spec,
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    te = config.transformer_impl == "transformer_engine"
    if config.num_moe_experts is not None:
        block = get_gpt_decoder_block_spec(
            config, use_transformer_engine=te, normalization="RMSNorm", vp_stage=vp_stage, pp_rank=pp_rank
        )
        if not te:
            for spec in block.layer_specs:
                _use_sdpa(spec)
        return block
    if te:
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
    spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=config.qk_layernorm)
    _use_sdpa(spec)
    return spec


def build_gpt_model(
    hf_config: Any,
    *,
    params_dtype: torch.dtype = torch.float32,
    bf16: bool = False,
    transformer_impl: TransformerImpl = "auto",
    fp8: str | None = None,
    fp8_recipe: str = "delayed",
    recompute: bool = False,
    make_vocab_size_divisible_by: int = 128,
    vocab_size: int | None = None,
    config=None,
    for_training: bool = True,
) -> list:
    """The ``GPTModel`` chunks of this pipeline rank (one, or ``vpp`` with a virtual pipeline).

    Needs :func:`megatron_ghpo.policy.parallel.init_parallel` first: TP/PP/VPP and sequence
    parallelism come from that layout. ``vocab_size`` overrides the padded vocabulary (e.g. the size
    a checkpoint was saved with); by default ``padded_vocab_size(hf vocab, make_vocab_size_divisible_by, TP)``.
    ``config`` passes a ready ``TransformerConfig`` instead of deriving one. ``for_training=False``:
    the model is only run forward (see :func:`transformer_config_from_hf`). Parameters are on this
    rank's device; weights are randomly initialised (load a checkpoint or HF weights next).
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    from megatron_ghpo.policy.parallel import get_layout

    layout = get_layout()
    arch: HFArch = hf_arch(hf_config)
    if config is None:
        config = transformer_config_from_hf(
            hf_config,
            tp=layout.tp,
            pp=layout.pp,
            vpp=layout.vpp,
            params_dtype=params_dtype,
            bf16=bf16,
            transformer_impl=transformer_impl,
            fp8=fp8,
            fp8_recipe=fp8_recipe,
            recompute=recompute,
            sequence_parallel=layout.sequence_parallel,
            ep=layout.ep,
            etp=layout.etp,
            for_training=for_training,
        )
    padded = vocab_size if vocab_size is not None else padded_vocab_size(arch.vocab_size, make_vocab_size_divisible_by, layout.tp)
    if padded < arch.vocab_size or padded % layout.tp != 0:
        raise ValueError(
            f"vocabulary size {padded} must be >= the tokenizer's {arch.vocab_size} and divisible by TP {layout.tp}"
        )
    chunks = []
    for vp_stage in range(layout.model_chunks_per_rank):
        stage = vp_stage if layout.vpp else None
        spec = layer_spec(config, vp_stage=stage, pp_rank=layout.pp_rank)
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=padded,
            max_sequence_length=arch.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            parallel_output=True,
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_percent=1.0,
            rotary_base=arch.rope_theta,
            rope_scaling=arch.llama3_rope_factor is not None,
            rope_scaling_factor=arch.llama3_rope_factor or 8.0,
            vp_stage=stage,
        )
        model.to(layout.device)
        chunks.append(model)
    return chunks
