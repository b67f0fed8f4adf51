"""HFEngine (the transformers fallback) against transformers itself, on tiny local models."""

from __future__ import annotations

import pytest
import torch

from megatron_ghpo.rollout import SamplingParams, build_rollout_engine
from megatron_ghpo.rollout.hf_sampling import filter_logits

pytestmark = pytest.mark.e2e

from _rollout_helpers import (
    MAX_MODEL_LEN,
    TINY,
    build_models,
    hf_greedy,
    hf_token_logprobs,
    load_hf,
    prompts,
    safetensors_stream,
)

TOL = 1e-4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("rollout_models_hf"))


@pytest.fixture(scope="module")
def hf(models):
    return {name: load_hf(path) for name, path in models.items()}


def engine_for(models, name):
    return build_rollout_engine("hf", models[name], max_model_len=MAX_MODEL_LEN, seed=0)


def test_greedy_and_sampled_logprobs_match_transformers(models, hf):
    engine, batch = engine_for(models, "A"), prompts(models["A"])
    greedy = engine.generate(batch, SamplingParams(temperature=0.0, max_tokens=20))
    for prompt, (c,) in zip(batch, greedy, strict=True):
        assert c.token_ids == hf_greedy(hf["A"], prompt, 20)
        assert c.finish_reason == ("length" if len(c.token_ids) == 20 else "stop")
        assert c.text == engine._tokenizer.decode(c.token_ids, skip_special_tokens=True)
    rng = torch.get_rng_state()
    sampled = engine.generate(batch, SamplingParams(n=3, temperature=0.7, max_tokens=16, seed=4))
    assert torch.equal(torch.get_rng_state(), rng), "sampling consumed torch's global RNG"
    worst = max(
        (hf_token_logprobs(hf["A"], p, c.token_ids, 0.7) - torch.tensor(c.logprobs)).abs().max().item()
        for p, group in zip(batch, sampled, strict=True)
        for c in group
    )
    assert worst <= TOL
    again = engine.generate(batch, SamplingParams(n=3, temperature=0.7, max_tokens=16, seed=4))
    assert [[c.token_ids for c in g] for g in again] == [[c.token_ids for c in g] for g in sampled]


def test_top_k_logprobs_are_the_truncated_distribution(models, hf):
    engine, prompt = engine_for(models, "A"), prompts(models["A"])[0]
    (group,) = engine.generate([prompt], SamplingParams(n=4, temperature=0.8, top_k=5, max_tokens=10, seed=1))
    with torch.no_grad():
        for c in group:
            logits = hf["A"](torch.tensor([prompt + c.token_ids])).logits[0, len(prompt) - 1 : -1].float()
            truncated = torch.log_softmax(filter_logits(logits / 0.8, 5, 1.0), -1)
            ranks = (logits > logits.gather(-1, torch.tensor(c.token_ids)[:, None])).sum(-1)
            assert (ranks < 5).all(), "a token outside the top 5 was sampled"
            ref = truncated.gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
            assert (ref - torch.tensor(c.logprobs)).abs().max().item() <= TOL
            full = hf_token_logprobs(hf["A"], prompt, c.token_ids, 0.8)
            assert (torch.tensor(c.logprobs) >= full - 1e-6).all()


def test_stop_strings_cut_text(models):
    engine, prompt = engine_for(models, "A"), prompts(models["A"])[1]
    (full,) = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=30))[0]
    text = full.text
    stop = text[4:7]
    assert len(stop) == 3, f"greedy text too short for the test: {text!r}"
    (cut,) = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=30, stop=(stop,)))[0]
    assert cut.finish_reason == "stop" and cut.text == text[: text.find(stop)]
    assert cut.token_ids == full.token_ids[: len(cut.token_ids)]


def test_streaming_and_scoring(models, hf):
    engine, batch = engine_for(models, "A"), prompts(models["A"])
    for i, p in enumerate(batch):
        engine.submit(f"r{i}", p, SamplingParams(n=i + 1, max_tokens=5, seed=None if i % 2 else i))
    with pytest.raises(ValueError, match="already pending"):
        engine.submit("r0", batch[0], SamplingParams())
    assert engine.has_pending()
    got = dict(engine.poll())
    assert {k: len(v) for k, v in got.items()} == {f"r{i}": i + 1 for i in range(len(batch))}
    assert not engine.has_pending() and engine.poll() == []
    seqs = [p + [11, 12, 13] for p in batch]
    for seq, scores in zip(seqs, engine.score_tokens(seqs), strict=True):
        assert (
            hf_token_logprobs(hf["A"], seq[:1], seq[1:], 1.0) - torch.tensor(scores)
        ).abs().max().item() <= TOL


@pytest.mark.parametrize("pair", [("A", "B"), ("C", "D")], ids=["tied", "untied"])
def test_load_weights(models, hf, pair):
    engine, batch = engine_for(models, pair[0]), prompts(models[pair[0]])
    engine.load_weights(safetensors_stream(models[pair[1]]))
    assert engine.weight_version == 1
    for prompt, (c,) in zip(
        batch, engine.generate(batch, SamplingParams(temperature=0.0, max_tokens=12)), strict=True
    ):
        assert c.token_ids == hf_greedy(hf[pair[1]], prompt, 12)
    with pytest.raises(ValueError, match="lacks"):
        engine.load_weights(item for item in safetensors_stream(models[pair[0]]) if "norm" not in item[0])
    with pytest.raises(ValueError, match="did you mean"):
        engine.load_weights((n.replace("layers", "layer"), t) for n, t in safetensors_stream(models[pair[0]]))
    assert engine.weight_version == 1


def test_load_weights_of_a_moe_model_by_checkpoint_names(models, tmp_path):
    """transformers keeps Qwen3-MoE experts fused in memory ([E, 2I, H] gate/up, [E, H, I] down); updates
    arrive per expert, named as in the checkpoint and by the weight bridge."""
    from megatron_ghpo.models.tiny import build_tiny_model

    from pathlib import Path

    tok = str(Path(models["A"]).parent / "tok")
    moe = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64, "head_dim": 32}
    a, b = (build_tiny_model(tmp_path / n, arch="qwen3_moe", seed=s, tie_word_embeddings=False, tokenizer_dir=tok,
                             **{**TINY, **moe}) for n, s in (("MA", 6), ("MB", 7)))  # fmt: skip
    names = [n for n, _ in safetensors_stream(b)]
    assert any(".mlp.experts.3.gate_proj.weight" in n for n in names)
    engine, batch = build_rollout_engine("hf", a, max_model_len=MAX_MODEL_LEN, seed=0), prompts(a)
    engine.load_weights(safetensors_stream(b))
    ref = load_hf(b)
    for prompt, (c,) in zip(batch, engine.generate(batch, SamplingParams(temperature=0.0, max_tokens=12)), strict=True):
        assert c.token_ids == hf_greedy(ref, prompt, 12)
    scored = engine.score_tokens([batch[0] + [5, 6, 7]])[0]
    assert (torch.tensor(scored[-3:]) - hf_token_logprobs(ref, batch[0], [5, 6, 7], 1.0)).abs().max().item() <= TOL
    with pytest.raises(ValueError, match="lacks"):
        engine.load_weights(item for item in safetensors_stream(a) if ".experts.1.down_proj" not in item[0])

