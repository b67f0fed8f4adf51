"""Tiny tokenizers and models built locally, for the CPU demo and the tests.

Nothing here is downloaded: the tokenizer is a byte-level BPE trained with the ``tokenizers``
library on a built-in corpus (digits split one per token, as in Qwen2/Llama-3), and the model is a
randomly initialised Qwen2, Llama, Qwen3 or Qwen3-MoE written with ``save_pretrained``. Both load back through the
ordinary ``from_pretrained`` code paths (transformers and vLLM).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from megatron_ghpo.ghpo.hints import HINT_TEMPLATE

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""ChatML, the Qwen2 family's template."""

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _corpus(seed: int = 0, lines: int = 4000) -> list[str]:
    """A small English + arithmetic + LaTeX corpus so common pieces get their own tokens."""
    rng = random.Random(seed)
    words = (
        "the answer is problem solution step compute find what value of and then so we have "
        "total sum difference product number equals therefore first next finally think "
        "system user assistant you are a helpful reasoning respond in following format"
    ).split()
    # The GHPO hint template's words, so a hinted prompt costs about as many tokens over an unhinted
    # one as with a production tokenizer (one per word) rather than one per character.
    words += HINT_TEMPLATE.replace(",", " ,").replace(":", " :").split()
    latex = ["\\boxed{", "\\frac{", "\\sqrt{", "\\cdot", "\\times", "$", "^{", "_{", "\\pi", "\\left(", "\\right)"]
    tags = ["<think>\n", "\n</think>\n", "<answer>\n", "\n</answer>"]
    out = []
    for _ in range(lines):
        a, b = rng.randint(0, 9999), rng.randint(0, 999)
        op = rng.choice("+-*=")
        parts = [
            " ".join(rng.choices(words, k=rng.randint(3, 10))),
            HINT_TEMPLATE if rng.random() < 0.25 else "",
            f"{a}{op}{b}={a + b if op != '*' else a * b}",
            rng.choice(latex) + str(rng.randint(0, 99)) + "}",
            rng.choice(tags),
        ]
        rng.shuffle(parts)
        out.append(" ".join(parts))
    return out


def build_tiny_tokenizer(out_dir: str | Path, *, vocab_size: int = 384, seed: int = 0):
    """Train a byte-level BPE tokenizer locally and save it as an HF tokenizer folder.

    Returns the loaded ``PreTrainedTokenizerFast`` (eos = ``<|im_end|>``, pad = ``<|endoftext|>``,
    ChatML chat template). Deterministic for a given ``vocab_size`` and ``seed``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if vocab_size < 300:
        raise ValueError(f"vocab_size={vocab_size}: must be >= 300 (256 bytes + special tokens + merges)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    return AutoTokenizer.from_pretrained(str(out))


TINY_ARCHS = ("qwen2", "llama", "qwen3", "qwen3_moe")


def _hf_config(arch: str, common: dict, *, head_dim: int | None, **moe):
    """The transformers config object of ``arch`` from the shared fields (and the family's own)."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

    if arch not in TINY_ARCHS:
        raise ValueError(f"arch={arch!r}: expected one of {list(TINY_ARCHS)}")
    if arch in ("qwen2", "llama"):
        return {"qwen2": Qwen2Config, "llama": LlamaConfig}[arch](**common)
    extra = {"head_dim": head_dim or common["hidden_size"] // common["num_attention_heads"], "attention_bias": False}
    if arch == "qwen3":
        return Qwen3Config(**common, **extra)
    moe["mlp_only_layers"] = list(moe["mlp_only_layers"])
    return Qwen3MoeConfig(**common, **extra, **moe, decoder_sparse_step=1, router_aux_loss_coef=0.001)


def build_tiny_model(
    out_dir: str | Path,
    *,
    arch: str = "qwen2",
    vocab_size: int | None = None,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 256,
    tie_word_embeddings: bool = True,
    initializer_range: float = 0.2,
    max_position_embeddings: int = 2048,
    rope_theta: float = 10000.0,
    seed: int = 0,
    tokenizer_dir: str | Path | None = None,
    head_dim: int | None = None,
    num_experts: int = 4,
    num_experts_per_tok: int = 2,
    moe_intermediate_size: int = 64,
    norm_topk_prob: bool = True,
    mlp_only_layers: tuple[int, ...] = (),
) -> str:
    """Write a randomly initialised HF folder (fp32 safetensors) and return its path.

    ``arch``: ``qwen2``, ``llama``, ``qwen3`` (q/k RMSNorm; ``head_dim`` may differ from
    ``hidden_size / num_heads``) or ``qwen3_moe`` (``num_experts`` routed experts of width
    ``moe_intermediate_size``, ``num_experts_per_tok`` per token; layers in ``mlp_only_layers``
    keep a dense MLP of width ``intermediate_size``). ``head_dim`` and the expert arguments are
    ignored by the families without them. With ``tokenizer_dir`` the tokenizer files are copied in
    and the vocabulary defaults to the tokenizer's size; without it a tokenizer is built in place.
    ``initializer_range`` defaults to 0.2 so two random models differ visibly under greedy decoding.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        tokenizer = build_tiny_tokenizer(out)
    else:
        from transformers import AutoTokenizer

        for f in Path(tokenizer_dir).iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                shutil.copy(f, out / f.name)
        tokenizer = AutoTokenizer.from_pretrained(str(out))
    vocab = vocab_size if vocab_size is not None else len(tokenizer)
    if vocab < len(tokenizer):
        raise ValueError(f"vocab_size={vocab} is smaller than the tokenizer's {len(tokenizer)} tokens")
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=initializer_range,
        max_position_embeddings=max_position_embeddings,
        rope_theta=rope_theta,
        rms_norm_eps=1e-6,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        dtype="float32",
    )
    config = _hf_config(arch, common, head_dim=head_dim, num_experts=num_experts, num_experts_per_tok=num_experts_per_tok,
                        moe_intermediate_size=moe_intermediate_size, norm_topk_prob=norm_topk_prob,
                        mlp_only_layers=mlp_only_layers)  # fmt: skip
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norms start at 1.0; perturb them so layouts are tested on non-trivial values
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):  # the router starts at zero: give it a real routing
                p.normal_(0.0, initializer_range)
    model.save_pretrained(str(out), safe_serialization=True)
    GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id).save_pretrained(str(out))
    meta = {"built_by": "megatron_ghpo.models.tiny", "arch": arch, "seed": seed}
    (out / "tiny_model.json").write_text(json.dumps(meta, indent=2))
    return str(out)
