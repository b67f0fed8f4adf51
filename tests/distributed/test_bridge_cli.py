"""``convert hf-to-megatron`` / ``megatron-to-hf`` / ``verify`` as a user runs them (each spawns its ranks).

One tiny untied GQA Qwen2: HF -> checkpoint (1 rank) -> HF at PP=2 (2 ranks, several safetensors
shards) whose tensors equal the source bit for bit, which ``from_pretrained`` loads with logits equal
to the source's, and which vLLM serves with the same greedy tokens; ``verify`` at TP=2 (2 ranks);
bad input fails fast with a message and leaves existing folders untouched. One tiny tied Qwen3-MoE
(4 experts, top-2): HF -> checkpoint -> HF with the experts split over EP=2 (2 ranks) bit for bit,
``verify`` at TP=2 x EP=2 (ETP=1), and an expert-parallel size that does not divide the experts refused.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

CLI = [sys.executable, "-m", "megatron_ghpo.bridge.cli", "convert"]


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "MEGATRON_GHPO_NO_PROGRESS": "1"}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=env, check=False)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict:
    import torch
    from safetensors.torch import load_file, save_file

    from megatron_ghpo.models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("bridge_cli")
    hf = Path(build_tiny_model(
        root / "hf", arch="qwen2", vocab_size=400, hidden_size=128, num_heads=4, num_kv_heads=2,  # head_dim 32: vLLM CPU needs >= 32
        intermediate_size=256, tie_word_embeddings=False,
    ))
    sd = load_file(str(hf / "model.safetensors"))  # non-zero biases, so a bias layout bug would show
    sd = {k: v + 0.1 * torch.randn_like(v) if k.endswith(".bias") else v for k, v in sd.items()}
    save_file(sd, str(hf / "model.safetensors"), metadata={"format": "pt"})
    ckpt, out = root / "ckpt", root / "out_pp2"
    r1 = _cli("hf-to-megatron", "--hf-dir", str(hf), "--out", str(ckpt))
    assert r1.returncode == 0, r1.stdout + r1.stderr
    r2 = _cli("megatron-to-hf", "--ckpt", str(ckpt), "--out", str(out), "--tp", "1", "--pp", "2", "--max-shard-size", "200KiB")
    assert r2.returncode == 0, r2.stdout + r2.stderr
    return {"root": root, "hf": hf, "ckpt": ckpt, "out": out}


def test_megatron_to_hf_output_is_bit_exact_and_loads(converted):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_ghpo.bridge.hf_load import INDEX_NAME, hf_weight_files

    hf, out = converted["hf"], converted["out"]
    assert (out / INDEX_NAME).is_file() and len(list(out.glob("model-*-of-*.safetensors"))) > 1
    src, dst = hf_weight_files(hf), hf_weight_files(out)
    assert sorted(src) == sorted(dst)
    for name in src:
        with safe_open(str(src[name]), "pt") as a, safe_open(str(dst[name]), "pt") as b:
            x, y = a.get_tensor(name), b.get_tensor(name)
            assert x.dtype == y.dtype and torch.equal(x, y), f"{name} differs after the round trip"
    assert AutoTokenizer.from_pretrained(str(out)).chat_template is not None
    tokens = torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()(tokens).logits
        got = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()(tokens).logits
    assert torch.equal(ref, got), f"logits differ: max {float((ref - got).abs().max())}"


def test_verify_prints_logit_diff(converted):
    r = _cli("verify", "--hf-dir", str(converted["hf"]), "--ckpt", str(converted["ckpt"]), "--tp", "2", "--pp", "1", "--tol", "1e-4")
    assert r.returncode == 0, r.stdout + r.stderr
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("max_abs_logit_diff=")]
    assert line, r.stdout
    assert float(line[0].split("=")[1]) <= 1e-4


def test_bad_input_fails_fast_without_touching_outputs(converted, tmp_path):
    hf, ckpt, out = converted["hf"], converted["ckpt"], converted["out"]
    before = sorted(p.name for p in out.iterdir())
    r = _cli("megatron-to-hf", "--ckpt", str(ckpt), "--out", str(out))
    assert r.returncode == 1 and "already exists and is not empty" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == before
    r = _cli("hf-to-megatron", "--hf-dir", str(tmp_path), "--out", str(tmp_path / "x"))
    assert r.returncode == 1 and "no config.json" in r.stderr
    r = _cli("megatron-to-hf", "--ckpt", str(hf), "--out", str(tmp_path / "y"))
    assert r.returncode == 1 and "ghpo_policy.json" in r.stderr
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text((hf / "config.json").read_text().replace('"vocab_size": 400', '"vocab_size": 512'))
    r = _cli("verify", "--hf-dir", str(other), "--ckpt", str(ckpt))
    assert r.returncode == 1 and "vocab_size" in r.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.fixture(scope="module")
def converted_moe(tmp_path_factory) -> dict:
    from megatron_ghpo.models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("bridge_cli_moe")
    hf = Path(build_tiny_model(
        root / "hf", arch="qwen3_moe", vocab_size=400, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=32,
        intermediate_size=128, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, seed=3,
    ))  # fmt: skip
    ckpt, out = root / "ckpt", root / "out_ep2"
    r1 = _cli("hf-to-megatron", "--hf-dir", str(hf), "--out", str(ckpt))
    assert r1.returncode == 0, r1.stdout + r1.stderr
    r2 = _cli("megatron-to-hf", "--ckpt", str(ckpt), "--out", str(out), "--ep", "2")
    assert r2.returncode == 0 and "EP=2" in r2.stdout, r2.stdout + r2.stderr
    return {"root": root, "hf": hf, "ckpt": ckpt, "out": out}


def test_moe_round_trip_at_ep2_and_verify_at_tp2_ep2(converted_moe, tmp_path):
    import torch
    from safetensors.torch import load_file

    hf, ckpt, out = converted_moe["hf"], converted_moe["ckpt"], converted_moe["out"]
    src, dst = load_file(str(hf / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sorted(src) == sorted(dst) and any(".mlp.experts.3.down_proj." in k for k in dst)
    bad = [k for k in src if not (src[k].dtype == dst[k].dtype and torch.equal(src[k], dst[k]))]
    assert not bad, f"differ after the EP=2 round trip: {bad}"
    r = _cli("verify", "--hf-dir", str(hf), "--ckpt", str(ckpt), "--tp", "2", "--ep", "2", "--etp", "1", "--tol", "1e-4")
    assert r.returncode == 0 and "TP=2 PP=1 EP=2 ETP=1" in r.stdout, r.stdout + r.stderr
    print("[verify TP=2 EP=2 ETP=1]", [ln for ln in r.stdout.splitlines() if ln.startswith("max_abs_logit_diff=")])
    r = _cli("megatron-to-hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "z"), "--ep", "3")
    assert r.returncode == 1 and "expert_model_parallel_size=3 does not divide num_experts=4" in r.stderr, r.stderr
    assert not (tmp_path / "z").exists()


def test_vllm_serves_the_exported_folder(converted):
    pytest.importorskip("vllm")
    import torch
    from transformers import AutoModelForCausalLM
    from vllm import LLM, SamplingParams

    out = converted["out"]
    prompt = [5, 17, 42, 99, 7]
    llm = LLM(model=str(out), dtype="float32", max_model_len=64, enforce_eager=True, seed=0)
    got = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    ref = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).generate(
        torch.tensor([prompt]), max_new_tokens=8, do_sample=False, min_new_tokens=8
    )
    assert list(got[0].outputs[0].token_ids) == ref[0, len(prompt) :].tolist()
