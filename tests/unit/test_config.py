"""Config tree: seed recipe loads, every validation rule, typed overrides, did-you-mean."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest
import yaml

from megatron_ghpo.config import Config, ConfigError
from megatron_ghpo.config_loader import FIELDS, IGNORED_KEYS, load_config, save_config

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT / "examples" / "qwen2.5-math-7b" / "ghpo.yaml"


def write(tmp_path, data) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


# sha256 of shared/reference/ghpo_recipe_qwen2.5-math-7b.yaml (the original GHPO README's recipe block)
REFERENCE_SHA256 = "8d2e4a32297ae6887c2e7107ee9389d6712a796b78ca8a28f0142657dc2546d1"


def test_seed_recipe_is_the_reference_byte_for_byte():
    assert hashlib.sha256(SEED.read_bytes()).hexdigest() == REFERENCE_SHA256
    ref = ROOT.parent / "shared" / "reference" / "ghpo_recipe_qwen2.5-math-7b.yaml"
    if ref.exists():
        assert SEED.read_bytes() == ref.read_bytes()


def test_seed_recipe_loads_with_one_warning_per_ignored_key(caplog):
    with caplog.at_level(logging.WARNING, logger="megatron_ghpo"):
        cfg = load_config(SEED)
    assert cfg.ghpo.rl_type == "ghpo"
    assert cfg.rollout.num_generations == 8
    assert cfg.rewards.reward_funcs == ["accuracy", "format"] and cfg.rewards.weights == [1.0, 0.5]
    assert cfg.algorithm.scale_rewards == "group"
    assert cfg.training.gradient_accumulation_steps == 28 and cfg.model.bf16
    warned = [r.getMessage() for r in caplog.records]
    for key in ("vllm_device", "hub_strategy", "push_to_hub", "attn_implementation"):
        assert sum(f"'{key}'" in m for m in warned) == 1, key
    grpo = load_config(SEED.parent / "grpo.yaml")
    assert grpo.ghpo.rl_type == "grpo"


def test_flat_and_sectioned_layouts_are_equivalent(tmp_path):
    flat = load_config(write(tmp_path, {"num_generations": 4, "learning_rate": 3e-5, "hint_ladder": [0.3, 0.6]}))
    nested = load_config(write(tmp_path, {"rollout": {"num_generations": 4}, "optimizer": {"learning_rate": 3e-5},
                                          "ghpo": {"hint_ladder": [0.3, 0.6]}}))
    assert flat == nested


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config(SEED, ["learning_rate=2e-5"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize(
    "key, near",
    [("num_generation", "num_generations"), ("learning_rat", "learning_rate"), ("hint_ladr", "hint_ladder")],
)
def test_unknown_key_names_nearest(tmp_path, key, near):
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'.*did you mean {near}\\?"):
        load_config(write(tmp_path, {key: 1}))


def test_unknown_key_inside_section(tmp_path):
    with pytest.raises(ConfigError, match="'temperature' in .*section model.*"):
        load_config(write(tmp_path, {"model": {"temperature": 1.0}}))


def test_overrides_are_typed():
    cfg = load_config(None, ["learning_rate=1e-5", "hint_ladder=[0.2,0.4]", "bf16=true", "top_k=-1",
                             "system_prompt=Be brief", "epsilon_high=0.28"])
    assert cfg.optimizer.learning_rate == 1e-5 and isinstance(cfg.optimizer.learning_rate, float)
    assert cfg.ghpo.hint_ladder == [0.2, 0.4] and cfg.model.bf16 is True and cfg.rollout.top_k == -1
    assert cfg.data.system_prompt == "Be brief" and cfg.algorithm.epsilon_high == 0.28
    with pytest.raises(ConfigError, match="num_generations='eight': must be an integer"):
        load_config(None, ["num_generations=eight"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["learning_rate"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("rl_type=gpro", r"rl_type='gpro': must be one of \['ghpo', 'grpo', 'grpo_fixed_hint'\]"),
        ("reward_weights=[1.0]", r"reward_weights=\[1.0\]: must have one weight per reward function \(2"),
        ("hint_ladder=[0.5,0.25]", r"hint_ladder=\[0.5, 0.25\]: must be strictly increasing"),
        ("hint_ladder=[0.5,0.5]", r"must be strictly increasing"),
        ("hint_ladder=[0.0,0.5]", r"strictly inside \(0, 1\)"),
        ("hint_ladder=[0.5,1.0]", r"strictly inside \(0, 1\)"),
        ("hint_ladder=[]", r"at least one ratio"),
        ("hint_ratio=1.5", r"hint_ratio=1.5"),
        ("num_generations=1", r"num_generations=1: must be >= 2"),
        ("temperature=0", r"temperature=0.0: must be > 0"),
        ("top_p=1.5", r"top_p=1.5"),
        ("loss_type=sum", r"loss_type='sum': must be one of"),
        ("scale_rewards=maybe", r"scale_rewards='maybe'"),
        ("tensor_model_parallel_size=0", r"tensor_model_parallel_size=0: must be >= 1"),
        ("virtual_pipeline_model_parallel_size=2", r"pipeline_model_parallel_size > 1"),
        ("max_steps=0", r"max_steps=0"),
        ("save_total_limit=0", r"save_total_limit=0"),
        ("transformer_impl=te", r"transformer_impl='te': must be one of"),
        ("shared_row_tokens=1", r"shared_row_tokens=1: must be >= 2"),
    ],
)
def test_field_rules(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_share_prompts_excludes_sequence_packing():
    assert load_config(None, ["share_prompts=true"]).training.share_prompts is True
    with pytest.raises(ConfigError, match=r"share_prompts=True: cannot be combined with sequence_packing: true"):
        load_config(None, ["share_prompts=true", "sequence_packing=true"])


def test_rollout_workers_resolve_and_refuse_what_cannot_run_on_every_rank():
    assert load_config(None, []).all_ranks_roll_out() is True  # auto: every rank generates
    assert load_config(None, ["rollout_workers=leaders"]).all_ranks_roll_out() is False
    assert load_config(None, ["dynamic_sampling=true"]).all_ranks_roll_out() is False  # auto falls back
    cfg = load_config(None, ["rollout_workers=all", "dynamic_sampling=true"])
    with pytest.raises(ConfigError, match="rollout_workers='all' cannot be used with dynamic_sampling: true"):
        cfg.validate(world_size=2)
    with pytest.raises(ConfigError, match="rollout_workers='everyone': must be one of"):
        load_config(None, ["rollout_workers=everyone"])


def test_scale_rewards_accepts_the_seed_booleans():
    assert load_config(None, ["scale_rewards=true"]).algorithm.scale_rewards == "group"
    assert load_config(None, ["scale_rewards=false"]).algorithm.scale_rewards == "none"
    assert load_config(None, ["scale_rewards=batch"]).algorithm.scale_rewards == "batch"


def test_global_batch_must_divide_by_num_generations():
    cfg = load_config(None, ["per_device_train_batch_size=6", "num_generations=8"])
    with pytest.raises(ConfigError, match=r"6\) x data-parallel size \(2\) x gradient_accumulation_steps \(1\) = 12"):
        cfg.validate(world_size=2)
    cfg.validate(world_size=4)  # 6 x 4 = 24 completions = 3 groups


def test_parallel_sizes_against_world_and_model():
    cfg = load_config(None, ["tensor_model_parallel_size=2", "pipeline_model_parallel_size=2"])
    with pytest.raises(ConfigError, match=r"world size 6 is not divisible by .*\(2\) x .*\(2\) = 4"):
        cfg.validate(world_size=6)
    dims = {"num_attention_heads": 6, "num_key_value_heads": 2, "num_hidden_layers": 4}
    with pytest.raises(ConfigError, match="tensor_model_parallel_size=4 must divide num_attention_heads=6") as e:
        load_config(None, ["tensor_model_parallel_size=4"]).validate(4, dims)
    assert "6" in str(e.value)
    with pytest.raises(ConfigError, match="must divide num_key_value_heads=1"):
        cfg.validate(4, {"num_attention_heads": 4, "num_key_value_heads": 1, "num_hidden_layers": 4})
    with pytest.raises(ConfigError, match="must divide num_hidden_layers=3"):
        cfg.validate(4, {"num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 3})
    cfg.validate(8, {"num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 4})


def test_cross_section_rules():
    with pytest.raises(ConfigError, match="sequence_parallel=True needs tensor_model_parallel_size > 1"):
        load_config(None, ["sequence_parallel=true"]).validate(1)
    with pytest.raises(ConfigError, match="fp8='hybrid' needs transformer_impl"):
        load_config(None, ["fp8=hybrid", "transformer_impl=local"]).validate(1)
    with pytest.raises(ConfigError, match="needs eval_tasks"):
        load_config(None, ["do_eval=true", "eval_strategy=steps"]).validate(1)


def test_leaf_names_unique_and_ignored_keys_disjoint():
    assert not set(IGNORED_KEYS) & set(FIELDS)
    assert len(FIELDS) == sum(len(f.default_factory().__dataclass_fields__) for f in Config.__dataclass_fields__.values())


def test_unquoted_yaml_no_means_the_string_no(tmp_path):
    cfg = load_config(write(tmp_path, {"save_strategy": False}), ["eval_strategy=no"])
    assert cfg.checkpoint.save_strategy == "no" and cfg.eval.eval_strategy == "no"


def test_expert_parallel_sizes_are_checked_against_ranks_and_model():
    from megatron_ghpo.cli import launch_world_size

    moe = {"num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "num_experts": 4}
    cfg = load_config(None, ["expert_model_parallel_size=2", "num_generations=4", "per_device_train_batch_size=8"])
    assert launch_world_size(cfg) == 2  # one data-parallel replica per expert shard
    cfg.validate(2, moe)
    with pytest.raises(ConfigError, match=r"= 2 must divide TP x DP = 1 ranks per pipeline stage"):
        cfg.validate(1, moe)
    with pytest.raises(ConfigError, match="must divide the model's num_experts=3"):
        cfg.validate(2, {**moe, "num_experts": 3})
    with pytest.raises(ConfigError, match="needs a mixture-of-experts model"):
        cfg.validate(2, {**moe, "num_experts": None})
    cfg = load_config(None, ["expert_model_parallel_size=2", "tensor_model_parallel_size=2",
                             "expert_tensor_parallel_size=1", "pipeline_model_parallel_size=2"])
    assert launch_world_size(cfg) == 4  # PP 2 x lcm(TP 2, EP 2 x ETP 1)
    with pytest.raises(ConfigError, match="expert_model_parallel_size"):
        load_config(None, ["expert_model_parallel_size=0"])
    with pytest.raises(ConfigError, match="expert_tensor_parallel_size"):
        load_config(None, ["expert_tensor_parallel_size=0"])
