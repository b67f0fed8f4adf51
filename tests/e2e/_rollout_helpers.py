"""Shared pieces of the rollout-engine tests: tiny models and transformers reference computations."""

from __future__ import annotations

from pathlib import Path

import torch

# head size 32: the smallest vLLM's CPU attention supports (64 hidden / 2 heads)
TINY = {"hidden_size": 64, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 128, "num_layers": 2}
MAX_MODEL_LEN = 256


def build_models(root: Path, names: str = "ABCD") -> dict[str, str]:
    """A tokenizer and tiny Qwen2 models: tied A (seed 0) and B (seed 1), untied C (2) and D (3)."""
    from megatron_ghpo.models.tiny import build_tiny_model, build_tiny_tokenizer

    build_tiny_tokenizer(root / "tok")
    specs = {"A": (0, True), "B": (1, True), "C": (2, False), "D": (3, False)}
    return {
        name: build_tiny_model(
            root / name, seed=seed, tie_word_embeddings=tied, tokenizer_dir=root / "tok", **TINY
        )
        for name, (seed, tied) in specs.items()
        if name in names
    }


def prompts(model_dir: str) -> list[list[int]]:
    """Chat-templated problems of different lengths plus one short raw prompt."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    questions = ["What is 2+3?", "Compute the sum of 17 and 25, then think.", "find x"]
    rendered = [
        tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in questions
    ]
    return [tok.encode(text) for text in rendered] + [[5, 6, 7]]


def load_hf(model_dir: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@torch.no_grad()
def hf_greedy(model: torch.nn.Module, prompt: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
    )
    return out[0, len(prompt) :].tolist()


@torch.no_grad()
def hf_token_logprobs(
    model: torch.nn.Module, prompt: list[int], completion: list[int], temperature: float
) -> torch.Tensor:
    """log_softmax(logits / T) of each completion token given everything before it: [len(completion)]."""
    ids = torch.tensor([prompt + completion])
    logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


def safetensors_stream(model_dir: str, log: list[str] | None = None):
    """Yield (name, tensor) one at a time from the folder's safetensors file (never all at once)."""
    from safetensors import safe_open

    with safe_open(str(Path(model_dir) / "model.safetensors"), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open handles are not dicts
            if log is not None:
                log.append(name)
            yield name, f.get_tensor(name)
