"""`megatron-ghpo` command line: train, sft, convert, eval, demo, plan."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from megatron_ghpo.config import Config, ConfigError
from megatron_ghpo.logging_utils import configure_logging


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (the original GHPO recipe's flat keys, or sections)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key (YAML-typed value); repeatable")
    p.add_argument("--dry-run", action="store_true", help="validate and print the resolved config and layout, then exit")
    p.add_argument("--help-config", action="store_true", help="list every config key with its section, type and default")


def launch_world_size(cfg: Config) -> int:
    """Ranks this run has (or will spawn): explicit config, the launcher's WORLD_SIZE, else the
    smallest layout: PP x lcm(TP, EP x ETP) (one data-parallel replica unless the experts need more)."""
    import math

    p = cfg.parallel
    if p.world_size is not None:
        return p.world_size
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return p.pipeline_model_parallel_size * math.lcm(p.tensor_model_parallel_size, p.expert_grid)


def load_and_validate(args: argparse.Namespace) -> tuple[Config, int]:
    from megatron_ghpo.config_loader import load_config, read_model_dims

    cfg = load_config(args.config, args.overrides)
    world = launch_world_size(cfg)
    cfg.validate(world, read_model_dims(cfg.model.model_name_or_path))
    return cfg, world


def describe(cfg: Config, world: int) -> str:
    """Human summary printed by --dry-run."""
    p, t, r = cfg.parallel, cfg.training, cfg.rollout
    dp = cfg.data_parallel_size(world)
    total = cfg.global_batch_completions(world)
    rewards = ", ".join(f"{n}={w:g}" for n, w in zip(cfg.rewards.reward_funcs, cfg.rewards.weights))
    lines = [
        f"rl_type: {cfg.ghpo.rl_type}",
        f"num_generations: {r.num_generations}",
        f"hint_ladder: {cfg.ghpo.hint_ladder} (hint_split={cfg.ghpo.hint_split}, hint_start={cfg.ghpo.hint_start}, "
        f"consistency={cfg.ghpo.hint_prompt_consistency}, start_hint_step={cfg.ghpo.start_hint_step})",
        f"rewards: {rewards}",
        f"parallel: world_size={world} = TP {p.tensor_model_parallel_size} x PP {p.pipeline_model_parallel_size} "
        f"x DP {dp} (EP {p.expert_model_parallel_size}, virtual_pipeline={p.virtual_pipeline_model_parallel_size}, sequence_parallel={p.sequence_parallel}, "
        f"distributed_optimizer={p.use_distributed_optimizer})",
        f"global batch: {t.per_device_train_batch_size} per rank x DP {dp} x grad-accum {t.gradient_accumulation_steps} "
        f"= {total} completions = {total // r.num_generations} prompts per optimizer step",
        f"model: {cfg.model.model_name_or_path or '(unset)'} (bf16={cfg.model.bf16}, transformer_impl="
        f"{cfg.model.transformer_impl}, fp8={cfg.model.fp8}, recompute={cfg.model.gradient_checkpointing})",
        f"data: {cfg.data.dataset_name or '(unset)'} [{cfg.data.dataset_prompt_column} -> "
        f"{cfg.data.dataset_answer_column} / {cfg.data.dataset_hint_column}]",
        f"loss: {cfg.algorithm.loss_type}, epsilon={cfg.algorithm.epsilon}, beta={cfg.algorithm.beta}, "
        f"scale_rewards={cfg.algorithm.scale_rewards}; lr={cfg.optimizer.learning_rate:g} "
        f"{cfg.optimizer.lr_scheduler_type}",
        f"output_dir: {cfg.checkpoint.output_dir}",
    ]
    return "\n".join(lines)


def help_config() -> str:
    from megatron_ghpo.config_loader import _HINTS, FIELDS

    rows = []
    for key, (section, f) in FIELDS.items():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        tp = str(_HINTS[key]).replace("typing.", "")
        rows.append(f"{section:10s} {key:40s} {tp:50s} {default!r}")
    return "\n".join(rows)


def cmd_train(args: argparse.Namespace) -> int:
    if args.help_config:
        print(help_config())
        return 0
    import yaml

    from megatron_ghpo.config_loader import config_to_dict

    cfg, world = load_and_validate(args)
    if args.dry_run:
        print(describe(cfg, world))
        print("--- resolved config ---")
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False, width=120))
        return 0
    return run_ranks(args, cfg, world, mode="rl")


def run_ranks(args: argparse.Namespace, cfg: Config, world: int, *, mode: str) -> int:
    """On a launched rank: run. Otherwise spawn ``world`` local ranks of this same command (CPU use)."""
    from megatron_ghpo.train.launcher import spawn_local, under_launcher

    if world > 1 and not under_launcher():
        return spawn_local("megatron_ghpo.cli", list(args.argv), world)
    if mode == "sft":
        from megatron_ghpo.train.sft import run_sft

        run_sft(cfg, resume=args.resume)
    else:
        from megatron_ghpo.train.loop import run_training

        run_training(cfg, resume=args.resume)
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    if args.help_config:
        print(help_config())
        return 0
    cfg, world = load_and_validate(args)
    if args.dry_run:
        print(describe(cfg, world))
        return 0
    return run_ranks(args, cfg, world, mode="sft")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-ghpo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="GHPO/GRPO training")
    _add_config_args(train)
    train.add_argument("--resume", help="'auto' (newest complete checkpoint in output_dir) or a checkpoint path")
    train.set_defaults(func=cmd_train)
    sft = sub.add_parser("sft", help="SFT warm-up (cross-entropy on worked solutions) on the Megatron policy")
    _add_config_args(sft)
    sft.add_argument("--resume", help=argparse.SUPPRESS)
    sft.set_defaults(func=cmd_sft)
    from megatron_ghpo.bridge.cli import add_convert_parser
    from megatron_ghpo.eval.cli import add_eval_parser

    add_convert_parser(sub)
    from megatron_ghpo.rollout.server import add_rollout_server_parser

    add_rollout_server_parser(sub)

    add_eval_parser(sub)
    from megatron_ghpo.demo import add_demo_parser

    add_demo_parser(sub)
    from megatron_ghpo.plan.cli import add_plan_parser

    add_plan_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    configure_logging(os.environ.get("MEGATRON_GHPO_LOG_LEVEL", "INFO"))
    try:
        return args.func(args) or 0
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError) as e:
        # Bad input (paths, datasets, model folders): one clear line; MEGATRON_GHPO_TRACEBACK=1 shows where.
        if os.environ.get("MEGATRON_GHPO_TRACEBACK") == "1":
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
