"""The planner's pure parts: presets, Megatron's buffer padding and sharding by hand, the CLI's table and errors."""

from __future__ import annotations

import argparse

import pytest

from megatron_ghpo.plan.activations import ActivationOptions, MicroBatchShape, step_peak
from megatron_ghpo.plan.buffers import build_buffers, static_bytes
from megatron_ghpo.plan.cli import add_plan_parser, make_plans, rank_plans, run_plan
from megatron_ghpo.plan.shapes import (
    ParamSpec,
    RankLayout,
    active_params,
    load_model_config,
    preset_names,
    rank_params,
    total_params,
)
from megatron_ghpo.policy.hf_arch import hf_arch

pytestmark = pytest.mark.unit

# Parameter counts the model cards state (billions), the planner must reproduce them from the presets.
PUBLISHED_B = {"qwen2.5-0.5b": 0.49, "qwen2.5-7b": 7.61, "qwen2.5-32b": 32.5, "qwen2.5-72b": 72.7,
               "llama-3.1-8b": 8.03, "llama-3.1-70b": 70.6, "qwen3-30b-a3b": 30.5}  # fmt: skip


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="megatron-ghpo")
    add_plan_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["plan", *argv])


@pytest.mark.parametrize("name", sorted(PUBLISHED_B))
def test_presets_reproduce_published_parameter_counts(name):
    assert name in preset_names()
    _, cfg = load_model_config(name)
    n = total_params(hf_arch(cfg)) / 1e9
    assert abs(n - PUBLISHED_B[name]) / PUBLISHED_B[name] < 0.01, f"{name}: {n:.3f}B vs {PUBLISHED_B[name]}B"


def test_moe_active_parameters():
    _, cfg = load_model_config("qwen3-30b-a3b")
    # model card: 3.3B activated, counting the input embedding too (no FLOPs, so not in active_params)
    a = hf_arch(cfg)
    assert abs((active_params(a) + a.vocab_size * a.hidden_size) / 1e9 - 3.3) < 0.1


def test_config_path_and_unknown_model(tmp_path):
    _, cfg = load_model_config("qwen2.5-0.5b")
    import json

    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_model_config(str(tmp_path))[1]["hidden_size"] == 896
    assert load_model_config(str(tmp_path / "config.json"))[1]["hidden_size"] == 896
    with pytest.raises(ValueError, match="--model 'no-such-model'"):
        load_model_config("no-such-model")


def test_distributed_optimizer_padding_and_shards_by_hand():
    # Megatron walks parameters in reverse: b (30) at [0, 30), a (100) starts at pad(30, 64) = 64 -> [64, 164);
    # the bucket ends at pad(164, lcm(dp=2, 128)) = 256; each DP rank owns 128 elements.
    a = ParamSpec(name="a", shape=(10, 10), bytes_per_element=2)
    b = ParamSpec(name="b", shape=(30,), bytes_per_element=2)
    (buf,) = build_buffers([a, b], dp=2, expert_dp=2, distributed_optimizer=True)
    assert buf.numel == 256
    assert [(p.name, s, e) for p, s, e in buf.buckets[0].params] == [("b", 0, 30), ("a", 64, 164)]
    r0 = static_bytes([[a, b]], dp=2, expert_dp=2, distributed_optimizer=True, dp_rank=0)
    r1 = static_bytes([[a, b]], dp=2, expert_dp=2, distributed_optimizer=True, dp_rank=1)
    assert (r0.param_bytes, r0.grad_bytes) == (2 * 256, 4 * 256)
    # rank 0 owns b[0:30] and a[64:128]; rank 1 owns a[128:164]: fp32 master + 2 fp32 moments + a 4-byte step each
    assert r0.optimizer_bytes == 12 * (30 + 64) + 2 * 4
    assert r1.optimizer_bytes == 12 * 36 + 4
    plain = static_bytes([[a, b]], dp=2, expert_dp=2, distributed_optimizer=False)
    assert (plain.param_bytes, plain.grad_bytes, plain.optimizer_bytes) == (2 * 130, 4 * 130, 12 * 130 + 8)


def test_rank_params_split_layers_and_vocabulary():
    _, cfg = load_model_config("qwen2.5-7b")
    first = rank_params(cfg, RankLayout(tp=4, pp=2, pp_rank=0))
    last = rank_params(cfg, RankLayout(tp=4, pp=2, pp_rank=1))
    assert first[0].shape == (152064 // 4, 3584) and first[0].name.startswith("embedding")
    assert last[-1].name == "output_layer.weight" and last[-1].shape == (152064 // 4, 3584)
    assert sum(p.numel for p in first + last) * 4 == pytest.approx(total_params(hf_arch(cfg)), rel=0.01)
    with pytest.raises(ValueError, match="num_attention_heads 28 not divisible by TP 8"):
        rank_params(cfg, RankLayout(tp=8))


def test_recompute_and_entropy_shrink_the_peak():
    a = hf_arch(load_model_config("qwen2.5-7b")[1])
    mb = MicroBatchShape(micro_batch=2, prompt_length=1024, completion_length=1024)

    def peak(**kw):
        return step_peak(a, mb, tp=2, pp=1, pp_rank=0, num_micro_batches=4, padded_vocab=152064, grad_buffer_bytes=0,
                         o=ActivationOptions(**kw)).bytes  # fmt: skip

    assert peak(recompute="full") < peak(recompute="selective") < peak(recompute="none")
    assert peak(compute_entropy=False) < peak(compute_entropy=True)


def test_cli_ranks_fitting_layouts_and_explains_rejections(capsys):
    args = _parse("--model", "qwen2.5-7b", "--micro-batch", "2", "--vllm-sleep", "--vllm-gpu-memory-utilization", "0.5")
    *_, plans = make_plans(args)
    ranked = rank_plans(plans)
    assert ranked and all(p.tp * p.pp * p.dp == 8 for p in plans)
    assert [p.time.total_s for p in ranked] == sorted(p.time.total_s for p in ranked)
    assert run_plan(args) == 0
    out = capsys.readouterr().out
    assert "layouts that fit" in out and "rejected" in out and "tok/s/GPU" in out
    assert "num_attention_heads 28 not divisible by TP 8" in out
    assert "needs " in out and "GiB > 80 GiB" in out and "optimizer" in out


def test_cli_fixed_layout_and_moe():
    *_, plans = make_plans(_parse("--model", "qwen3-30b-a3b", "--nodes", "2", "--tp", "2", "--pp", "1", "--ep", "8"))
    assert [(p.tp, p.pp, p.dp, p.ep) for p in plans] == [(2, 1, 8, 8)]
    experts = [p for p in rank_params(load_model_config("qwen3-30b-a3b")[1], RankLayout(tp=2, ep=8)) if "experts" in p.name]
    assert len(experts) == 48 * 2 * 128 // 8 and all(p.expert_parallel for p in experts)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tp", "0"], "argument --tp: must be >= 1"),
        (["--mfu", "1.5"], "argument --mfu: must be in (0, 1]"),
        (["--recompute", "some"], "argument --recompute: invalid choice"),
        (["--max-prompt-length", "x"], "argument --max-prompt-length: expected a positive integer"),
    ],
)
def test_cli_bad_flags_name_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit):
        _parse("--model", "qwen2.5-7b", *argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tp", "16"], "--tp 16 spans more than one node"),
        (["--tp", "4", "--pp", "4"], "--tp 4 x --pp 4 = 16 does not fit --nodes 1 x --gpus-per-node 8 = 8 GPUs"),
        (["--mean-prompt-length", "4096"], "--mean-prompt-length 4096 exceeds --max-prompt-length 2048"),
        (["--ep", "2"], "--ep 2: qwen2.5-7b is a dense model"),
    ],
)
def test_cli_inconsistent_input_is_a_clear_error(argv, message, capsys):
    assert run_plan(_parse("--model", "qwen2.5-7b", *argv)) == 2
    assert message in capsys.readouterr().err
