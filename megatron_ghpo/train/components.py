"""Build every stage of the trainer from the config: the only place config meets the packages."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from megatron_ghpo.config import Config
from megatron_ghpo.config_loader import config_to_dict, save_config
from megatron_ghpo.logging_utils import get_logger
from megatron_ghpo.records import Group, TrainBatch
from megatron_ghpo.rollout.base import SamplingParams
from megatron_ghpo.train.data_stream import PromptStream
from megatron_ghpo.train.dist_utils import (
    TrainerGroups,
    any_across_workers,
    build_groups,
    gather_across_workers,
)
from megatron_ghpo.train.metrics import MetricsLogger

logger = get_logger("trainer")


def check_model_dir(path: str) -> Path:
    p = Path(path)
    if not path:
        raise ValueError("model_name_or_path is empty: point it at a local HF model folder")
    if not p.is_dir():
        raise FileNotFoundError(
            f"model_name_or_path {path!r} is not a local folder; download the model first (e.g. "
            f"`hf download {path} --local-dir models/{p.name}`) and point model_name_or_path at that folder"
        )
    if not (p / "config.json").is_file() and not (p / "hf" / "config.json").is_file():
        raise FileNotFoundError(
            f"model folder {path!r} has no config.json: it is neither a Hugging Face model folder nor a checkpoint "
            "written by `megatron-ghpo convert hf-to-megatron`"
        )
    return p


def hf_side_dir(model_dir: str | Path) -> str:
    """The folder holding config.json and the tokenizer: the model folder itself, or ``CKPT/hf`` of a
    Megatron checkpoint written by `megatron-ghpo convert hf-to-megatron`."""
    p = Path(model_dir)
    return str(p / "hf") if not (p / "config.json").is_file() and (p / "hf" / "config.json").is_file() else str(p)


def build_policy(cfg: Config, model_dir: Path, *, total_steps: int, mode: str):
    from megatron_ghpo.policy import MegatronPolicy
    from megatron_ghpo.policy.from_config import policy_kwargs, weights_source

    return MegatronPolicy(**weights_source(model_dir), **policy_kwargs(cfg, total_steps=total_steps, mode=mode))


def sampling_from_config(cfg: Config, *, n: int | None = None) -> SamplingParams:
    r = cfg.rollout
    return SamplingParams(n=n or r.num_generations, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                          max_tokens=r.max_completion_length, logprobs=True, seed=cfg.training.seed)


def ghpo_options(cfg: Config, *, streaming: bool):
    from megatron_ghpo.ghpo.options import GHPOOptions

    g = cfg.ghpo
    return GHPOOptions(rl_type=g.rl_type, hint_ladder=list(g.hint_ladder), hint_ratio=g.hint_ratio,
                       start_hint_step=g.start_hint_step, hint_template=g.hint_template, hint_split=g.hint_split,
                       hint_guard=g.hint_guard, hint_prompt_consistency=g.hint_prompt_consistency,
                       hint_start=g.hint_start, hint_skip_repeats=g.hint_skip_repeats, hint_retry=g.hint_retry,
                       streaming=streaming,
                       dynamic_sampling=g.dynamic_sampling, dynamic_sampling_max_rounds=g.dynamic_sampling_max_rounds)


def load_training_problems(cfg: Config):
    from megatron_ghpo.data import load_problems

    d = cfg.data
    problems = load_problems(d.dataset_name, prompt_column=d.dataset_prompt_column,
                             answer_column=d.dataset_answer_column, hint_column=d.dataset_hint_column,
                             split=d.dataset_train_split, answer_from=d.dataset_answer_from,
                             on_invalid="skip" if d.skip_invalid_rows else "error", limit=d.max_train_samples)
    if not problems:
        raise ValueError(f"dataset {d.dataset_name!r} yielded no usable rows; check the file and the column mapping")
    return problems


def _sum_list(xs: list[float], groups: TrainerGroups) -> list[float]:
    if groups.leaders_group is None:
        return xs
    import torch.distributed as dist

    t = torch.tensor(xs, dtype=torch.float64)
    dist.all_reduce(t, group=groups.leaders_group)
    return t.tolist()


class Refill:
    """DAPO refill draws: deterministic in (step, round), so resumed runs draw the same problems."""

    def __init__(self, stream: PromptStream):
        self.stream, self.step, self.round = stream, 0, 0

    def start(self, step: int) -> None:
        self.step, self.round = step, 0

    def __call__(self, count: int):
        self.round += 1
        return self.stream.refill(self.step, self.round, count)


def timed_scoring(score):
    """The sampler's score callable, also reporting its wall time as ``perf/score_s`` (summed over the
    step's calls: verification runs inside the rollout stage, between generation passes)."""

    def timed(groups: list[Group]) -> dict[str, float]:
        t0 = time.perf_counter()
        metrics = dict(score(groups) or {})
        metrics["perf/score_s"] = time.perf_counter() - t0
        return metrics

    return timed


def engine_dtype(cfg: Config) -> str:
    d = cfg.model.torch_dtype
    return ("bfloat16" if cfg.model.bf16 else "float32") if d == "auto" else d


def engine_from_config(cfg: Config, model_dir: str, *, groups: TrainerGroups):
    """This rank's rollout engine: colocated vLLM (or the transformers engine when ``use_vllm: false``),
    or, with ``rollout_mode: server``, a client of the rollout server on the leaders (None elsewhere)."""
    from megatron_ghpo.rollout.factory import build_rollout_engine

    r = cfg.rollout
    if r.rollout_mode == "server":
        if not groups.is_leader:
            return None
        from megatron_ghpo.rollout.remote import RemoteRolloutEngine

        return RemoteRolloutEngine(
            r.rollout_server_url, timeout_s=r.rollout_server_timeout_s, ready_timeout_s=r.rollout_server_ready_timeout_s,
            bucket_bytes=r.bridge_bucket_bytes, push_weights=groups.dp_rank == 0,
            shutdown_on_close=r.rollout_server_shutdown_on_close,
            min_model_len=cfg.data.max_prompt_length + r.max_completion_length + 1,
        )
    # +1: scoring a full prompt + completion (check_weight_sync) asks the engine for one more position
    common = dict(dtype=engine_dtype(cfg), max_model_len=cfg.data.max_prompt_length + r.max_completion_length + 1,
                  seed=cfg.training.seed)
    if hf_side_dir(model_dir) != str(model_dir):
        raise ValueError(
            f"model_name_or_path {model_dir!r} is a Megatron checkpoint; the colocated rollout engine starts from "
            f"a Hugging Face folder: run `megatron-ghpo convert megatron-to-hf --ckpt {model_dir} --out DIR` and "
            "point model_name_or_path at DIR"
        )
    if not r.use_vllm:
        return build_rollout_engine("hf", model_dir, **common)
    return build_rollout_engine(
        "vllm", model_dir, **common, gpu_memory_utilization=r.vllm_gpu_memory_utilization,
        enable_prefix_caching=r.vllm_enable_prefix_caching,
        kv_cache_gib=None if torch.cuda.is_available() else r.vllm_kv_cache_gb,
        colocate="per_rank" if groups.world_size > 1 else "none",
        enforce_eager=not torch.cuda.is_available() if r.vllm_enforce_eager is None else r.vllm_enforce_eager,
    )


@dataclass(kw_only=True)
class Components:
    cfg: Config
    groups: TrainerGroups
    policy: Any
    stream: PromptStream
    tokenizer: Any
    metrics: MetricsLogger
    sampling: SamplingParams
    engine: Any = None
    sampler: Any = None
    memory: Any = None
    scorer: Any = None
    renderer: Any = None
    refill: Any = None
    evaluator: Any = None
    pool: Any = None

    def rollout_share(self, step: int) -> list:
        """This worker's consecutive share of its replica's prompts for ``step`` (all of them when only
        the leaders roll out); the shares, gathered in replica-rank order, are the replica's batch."""
        batch = self.stream.local_batch(step)
        index, count = self.groups.worker_share
        bounds = [len(batch) * j // count for j in range(count + 1)]
        return batch[bounds[index] : bounds[index + 1]]

    def make_batch(self, groups: list[Group]) -> tuple[TrainBatch, dict[str, float]]:
        from megatron_ghpo.algo.advantages import group_advantages, reward_moments, std_from_moments
        from megatron_ghpo.ghpo.batch import build_train_batch, group_rewards

        rewards = group_rewards(groups)
        batch_std = None
        if self.cfg.algorithm.scale_rewards == "batch" and self.groups.leaders_group is not None:
            import torch.distributed as dist

            moments = reward_moments(rewards)
            dist.all_reduce(moments, group=self.groups.leaders_group)
            batch_std = std_from_moments(moments)
        adv = group_advantages(rewards, self.cfg.algorithm.scale_rewards, batch_std=batch_std)
        batch = build_train_batch(groups, adv, eos_token_id=self.tokenizer.eos_token_id,
                                  mask_truncated_completions=self.cfg.algorithm.mask_truncated_completions)
        if not self.cfg.algorithm.use_rollout_logprobs:  # the reference's ratio = 1 (old = current, detached)
            batch.samples = [replace(s, rollout_logprobs=s.old_logprobs, old_logprobs=None) for s in batch.samples]
        lengths = [len(s.completion_ids) for s in batch.samples]
        finite = rewards[torch.isfinite(rewards)]
        return batch, {"train/reward": float(finite.mean()) if finite.numel() else float("nan"),
                       "train/reward_std": float(finite.std()) if finite.numel() > 1 else 0.0,
                       "train/advantage_abs_mean": float(adv.abs().mean()),
                       "rollout/completion_len": sum(lengths) / max(1, len(lengths)),
                       "rollout/truncated_frac": sum(c.truncated for g in groups for c in g.completions)
                       / max(1, len(lengths))}

    def engine_sleep(self) -> None:
        if self.engine is not None and self.cfg.rollout.vllm_enable_sleep_mode:
            self.engine.sleep()

    def engine_wake(self) -> None:
        if self.engine is not None and self.cfg.rollout.vllm_enable_sleep_mode:
            self.engine.wake()

    def evaluate(self, step: int) -> dict[str, float]:
        """In-loop evaluation on the leader's engine (no hints); ``eval_tasks`` entries are registered
        task names or ``name=...,path=...`` custom task strings."""
        if not self.groups.is_leader:
            return {}
        if self.evaluator is None:
            from megatron_ghpo.eval.inloop import InLoopEvaluator
            from megatron_ghpo.eval.runner import SamplingOverrides
            from megatron_ghpo.eval.scoring import PoolScorer
            from megatron_ghpo.eval.tasks import parse_custom_task

            e = self.cfg.eval
            tasks = [parse_custom_task(t) if "=" in t else t for t in e.eval_tasks]
            self.evaluator = InLoopEvaluator(
                self.renderer, tasks, samples=e.eval_samples, limit=e.eval_limit,
                sampling=SamplingOverrides(samples=e.eval_samples, max_new_tokens=self.cfg.rollout.max_completion_length,
                                           seed=self.cfg.training.seed),
                scorer=PoolScorer(self.pool), out_root=Path(self.cfg.checkpoint.output_dir) / "eval",
                shard=(self.groups.dp_rank, self.groups.dp_size),
                all_reduce=lambda xs: _sum_list(xs, self.groups),
            )
        return self.evaluator(self.engine, step)

    def close(self) -> None:
        self.metrics.close()
        if self.pool is not None:
            self.pool.close()
        if self.engine is not None:
            self.engine.close()


def build_components(cfg: Config, *, resume_step: int) -> Components:
    """Collective: every rank calls it. Heavy imports happen here, not at module import."""
    from transformers import AutoTokenizer

    from megatron_ghpo.rewards import RewardScorer, get_reward_funcs

    model_dir = check_model_dir(cfg.model.model_name_or_path)
    problems = load_training_problems(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    prompts_per_step = cfg.global_batch_completions(world) // cfg.rollout.num_generations
    total_steps = PromptStream.count_steps(len(problems), prompts_per_step, cfg.training.num_train_epochs,
                                           cfg.training.max_steps)
    policy = build_policy(cfg, model_dir, total_steps=total_steps, mode="rl")
    groups = build_groups(policy.replica_ranks(), policy.rank, all_ranks_roll_out=cfg.all_ranks_roll_out())
    if groups.is_logger:
        logger.info("rollout workers: %s", f"all {groups.world_size} ranks" if groups.all_ranks_roll_out
                    else f"{groups.dp_size} replica leader(s)")
    out = Path(cfg.checkpoint.output_dir)
    if groups.is_logger:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    tokenizer = AutoTokenizer.from_pretrained(hf_side_dir(model_dir), trust_remote_code=cfg.model.trust_remote_code)
    stream = PromptStream(problems, prompts_per_step=prompts_per_step, dp_rank=groups.dp_rank,
                          dp_size=groups.dp_size, seed=cfg.training.seed, shuffle=cfg.data.shuffle_dataset)
    lg = cfg.logging
    metrics = MetricsLogger(out, enabled=groups.is_logger, report_to=lg.report_to, run_name=lg.run_name,
                            wandb_project=lg.wandb_project, wandb_mode=os.environ.get("WANDB_MODE", lg.wandb_mode),
                            config=config_to_dict(cfg), resume_step=resume_step)
    c = Components(cfg=cfg, groups=groups, policy=policy, stream=stream, tokenizer=tokenizer, metrics=metrics,
                   sampling=sampling_from_config(cfg))
    # vLLM builds its process groups over the whole torch world, so every rank starts an engine at the
    # same moment (colocate="per_rank"); the rollout workers (every rank, or the leaders) generate.
    c.engine = engine_from_config(cfg, str(model_dir), groups=groups)
    if groups.is_worker:
        from megatron_ghpo.data import PromptRenderer
        from megatron_ghpo.ghpo.memory import DifficultyMemory
        from megatron_ghpo.ghpo.sampler import GHPOSampler
        from megatron_ghpo.rollout.base import StreamingRolloutEngine

        g = cfg.ghpo
        c.renderer = PromptRenderer(tokenizer, system_prompt=cfg.data.system_prompt,
                                    max_prompt_length=cfg.data.max_prompt_length, hint_template=g.hint_template,
                                    hint_split=g.hint_split, hint_guard=g.hint_guard)
        from megatron_ghpo.rewards import VerifierPool

        c.pool = VerifierPool(cfg.rewards.reward_num_workers, cfg.rewards.reward_timeout_s)
        c.scorer = RewardScorer(get_reward_funcs(cfg.rewards.reward_funcs), cfg.rewards.weights, pool=c.pool)
        c.memory = DifficultyMemory()
        streaming = g.streaming and isinstance(c.engine, StreamingRolloutEngine)
        c.refill = Refill(stream)
        c.sampler = GHPOSampler(
            engine=c.engine, render=c.renderer.render, score=timed_scoring(c.scorer.score_groups), sampling=c.sampling,
            options=ghpo_options(cfg, streaming=streaming), any_global=lambda f: any_across_workers(f, groups),
            memory=c.memory, gather_objects=(lambda obj: gather_across_workers(obj, groups)),
            refill=c.refill if g.dynamic_sampling else None,
        )
    return c
