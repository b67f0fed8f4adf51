"""HF folder reading/writing of the bridge and its CLI argument parsing (no processes, no Megatron)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors.torch import save_file

from megatron_ghpo.bridge.cli import _size, add_convert_parser
from megatron_ghpo.bridge.hf_folder import copy_hf_side_files, staged_output, write_hf_folder
from megatron_ghpo.bridge.hf_load import INDEX_NAME, hf_weight_files

pytestmark = pytest.mark.unit


def _tiny_llama(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    src = tmp_path / "src"
    model.save_pretrained(str(src))
    (src / "tokenizer_config.json").write_text("{}")
    return model, src


def test_write_hf_folder_shards_index_and_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    model, src = _tiny_llama(tmp_path)
    sd = model.state_dict()
    out = tmp_path / "out"
    names = write_hf_folder(iter(sd.items()), out, src, dtype=torch.bfloat16, max_shard_bytes=4096)
    assert names == list(sd)
    index = json.loads((out / INDEX_NAME).read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    assert shards[0].endswith(f"-of-{len(shards):05d}.safetensors")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert (out / "tokenizer_config.json").is_file() and not list(out.glob(".*"))
    files = hf_weight_files(out)
    assert sorted(files) == sorted(sd)
    loaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).state_dict()
    assert all(torch.equal(loaded[k], sd[k].to(torch.bfloat16).float()) for k in sd)


def test_write_hf_folder_refuses_existing_output_and_cleans_up_on_error(tmp_path):
    _, src = _tiny_llama(tmp_path)
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        write_hf_folder(iter([]), src, src, dtype=torch.float32)

    def broken():
        yield "a", torch.zeros(2)
        raise RuntimeError("rank died")

    with pytest.raises(RuntimeError, match="rank died"):
        write_hf_folder(broken(), tmp_path / "new", src, dtype=torch.float32)
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".new.tmp-*"))
    with pytest.raises(ValueError, match="produced twice"):
        write_hf_folder(iter([("a", torch.zeros(1)), ("a", torch.zeros(1))]), tmp_path / "dup", src, dtype=torch.float32)


def test_staged_output_renames_only_on_success(tmp_path):
    with staged_output(tmp_path / "ok") as tmp:
        (tmp / "f").write_text("x")
        assert not (tmp_path / "ok").exists()
    assert (tmp_path / "ok" / "f").read_text() == "x"
    (tmp_path / "empty").mkdir()
    with staged_output(tmp_path / "empty") as tmp:  # an empty folder may be replaced
        (tmp / "g").write_text("y")
    assert (tmp_path / "empty" / "g").is_file()


def test_hf_weight_files_variants_and_errors(tmp_path):
    a, b = {"x": torch.zeros(2)}, {"y": torch.ones(2)}
    one = tmp_path / "one"
    one.mkdir()
    save_file({**a, **b}, str(one / "model.safetensors"))
    assert {k: p.name for k, p in hf_weight_files(one).items()} == {"x": "model.safetensors", "y": "model.safetensors"}
    many = tmp_path / "many"
    many.mkdir()
    save_file(a, str(many / "m1.safetensors"))
    save_file(b, str(many / "m2.safetensors"))
    assert {k: p.name for k, p in hf_weight_files(many).items()} == {"x": "m1.safetensors", "y": "m2.safetensors"}
    (many / INDEX_NAME).write_text(json.dumps({"weight_map": {"x": "m1.safetensors", "y": "gone.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="gone.safetensors"):
        hf_weight_files(many)
    dup = tmp_path / "dup"
    dup.mkdir()
    save_file(a, str(dup / "m1.safetensors"))
    save_file(a, str(dup / "m2.safetensors"))
    with pytest.raises(ValueError, match="'x' is in both m1.safetensors and m2.safetensors"):
        hf_weight_files(dup)
    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="safe_serialization"):
        hf_weight_files(binary)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        copy_hf_side_files(binary, tmp_path / "side")


def test_convert_parser_and_sizes():
    assert _size("256MiB") == 256 * 2**20 and _size("5GB") == 5 * 10**9 and _size("1024") == 1024
    with pytest.raises(argparse.ArgumentTypeError):
        _size("lots")
    parser = argparse.ArgumentParser()
    add_convert_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["convert", "megatron-to-hf", "--ckpt", ".", "--out", "o", "--tp", "2", "--pp", "2",
                              "--bucket-bytes", "1MiB"])  # fmt: skip
    assert (args.tp, args.pp, args.bucket_bytes, args.hf_config) == (2, 2, 2**20, None)
    with pytest.raises(SystemExit):
        parser.parse_args(["convert", "verify", "--hf-dir", ".", "--ckpt", ".", "--tp", "0"])
