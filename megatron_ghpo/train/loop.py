"""The GHPO/GRPO training loop: rollout -> rewards -> GHPO ladder -> advantages -> Megatron train step
-> weight sync, each stage timed. No algorithm lives here: every stage is a call into its package."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from megatron_ghpo.config import Config
from megatron_ghpo.ghpo.sampler import merge_results
from megatron_ghpo.logging_utils import get_logger, progress
from megatron_ghpo.train import checkpointing as ck
from megatron_ghpo.train.components import Components, build_components, engine_dtype, hf_side_dir
from megatron_ghpo.train.dist_utils import (
    barrier,
    broadcast_object,
    gather_to_leader,
    mean_across_leaders,
    replica_barrier,
)
from megatron_ghpo.train.state import load_trainer_state, replace_hf_folder, save_trainer_state

logger = get_logger("trainer")


class StageTimer:
    """Wall time per named stage of one step, reported as ``perf/<stage>_s``."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0

    def metrics(self) -> dict[str, float]:
        return {f"perf/{k}_s": v for k, v in self.times.items()}


class Trainer:
    def __init__(self, cfg: Config, *, resume: str | None):
        self.cfg = cfg
        if int(os.environ.get("RANK", "0")) == 0:
            ck.lock_output_dir(cfg.checkpoint.output_dir)
        self.resume_from = ck.resolve_resume(cfg.checkpoint.output_dir, resume, cfg.checkpoint.overwrite_output_dir)
        self.c: Components = build_components(cfg, resume_step=self._resume_step())
        self.start_step = 0
        self.weight_version = 0
        """Weight loads into the engine since the run began (restored on resume)."""
        if self.resume_from is not None:
            self._load(self.resume_from)
        self.total_steps = self.c.stream.total_steps(cfg.training.num_train_epochs, cfg.training.max_steps)

    def _resume_step(self) -> int:
        if self.resume_from is None:
            return 0
        return int(self.resume_from.name.split("_")[1])

    # ---- one optimizer step, as in the architecture diagram -------------------------------------
    def step(self, step: int) -> dict[str, float]:
        c, timer = self.c, StageTimer()
        metrics: dict[str, float] = {}
        batch = None
        if c.groups.is_worker:
            with timer("rollout"):  # generation + rewards + GHPO ladder (hinted regenerations included)
                if c.groups.all_ranks_roll_out:  # the replica's workers start together, so the stage's
                    replica_barrier(c.groups)    # time holds every worker's generation and scoring
                c.sampler.sampling = replace(c.sampling, seed=self.cfg.training.seed * 100_003 + step)
                c.refill.start(step)
                result = c.sampler.sample(c.rollout_share(step), step)
                if c.groups.all_ranks_roll_out:  # every rank sampled a share: the leader merges them
                    parts = gather_to_leader(result, c.groups)
                    if c.groups.is_leader:
                        result = merge_results(parts)
        if c.groups.is_leader:
            with timer("advantages"):
                batch, adv_metrics = c.make_batch(result.groups)
            metrics.update(result.metrics)
            metrics.update(adv_metrics)
        with timer("broadcast"):
            batch = broadcast_object(batch, c.groups)
        with timer("train"):
            c.engine_sleep()
            train_metrics = c.policy.train_step(batch)
            c.engine_wake()
        with timer("sync"):
            self._sync_weights()
        if self.cfg.rollout.check_weight_sync:
            metrics["rollout/sync_max_logprob_diff"] = self._check_sync(batch)
        metrics.update(train_metrics)
        metrics.update(timer.metrics())
        step_s = sum(timer.times.values())
        tokens = sum(len(s.prompt_ids) + len(s.completion_ids) for s in batch.samples)
        metrics["perf/step_s"] = step_s
        metrics["perf/tokens_per_s"] = tokens * c.groups.dp_size / max(step_s, 1e-9)
        metrics["train/lr"] = c.policy.learning_rate()
        metrics["train/epoch"] = c.stream.epoch_of(step + 1)
        metrics["rollout/weight_version"] = float(self.weight_version)
        if c.groups.is_leader:
            metrics = mean_across_leaders(metrics, c.groups)
        return metrics

    def _sync_weights(self) -> None:
        """Every rank walks the bridge's bucketed export; each rollout worker feeds its engine as buckets
        arrive (every rank gets every tensor when all ranks roll out, else the leader only)."""
        c = self.c
        every = c.groups.all_ranks_roll_out
        weights = c.policy.export_hf_weights(bucket_bytes=self.cfg.rollout.bridge_bucket_bytes,
                                             dtype=getattr(torch, engine_dtype(self.cfg)),
                                             destination="all" if every else "first")
        if c.groups.is_worker:
            c.engine.load_weights(weights)
        else:  # the export is collective: non-leaders take part and drop the tensors
            for _ in weights:
                pass
        self.weight_version += 1

    def _check_sync(self, batch) -> float:
        """Largest |engine - policy| log-prob over the completion of the batch's first sequence, both at
        temperature 1, right after a sync (collective: the policy's forward runs on every rank)."""
        from megatron_ghpo.records import TrainBatch

        probe = batch.samples[0]
        policy_lp = self.c.policy.compute_logprobs(TrainBatch(samples=[probe]), temperature=1.0)[0]
        if not self.c.groups.is_leader:
            return float("nan")
        engine_lp = self.c.engine.score_tokens([list(probe.prompt_ids) + list(probe.completion_ids)])[0]
        tail = engine_lp[len(engine_lp) - len(policy_lp):]
        return max(abs(a - b) for a, b in zip(tail, policy_lp))

    # ---- the run -----------------------------------------------------------------------------
    def train(self) -> None:
        cfg, c = self.cfg, self.c
        steps_per_epoch = c.stream.steps_per_epoch()
        logger.info("training steps %d..%d (%d steps per epoch)", self.start_step + 1, self.total_steps, steps_per_epoch)
        for step in progress(range(self.start_step, self.total_steps), desc="train", total=self.total_steps - self.start_step):
            metrics = self.step(step)
            n = step + 1
            if self._should_eval(n):
                metrics.update(c.evaluate(n))
            if c.groups.is_logger:
                c.metrics.log(n, metrics)
            if self._should_save(n, steps_per_epoch):
                self.save(n)
        replace_hf_folder(c.policy, Path(cfg.checkpoint.output_dir) / "hf", hf_side_dir(cfg.model.model_name_or_path),
                          c.groups.rank)
        barrier()
        logger.info("final weights written as a Hugging Face folder: %s", Path(cfg.checkpoint.output_dir) / "hf")
        c.close()

    def _should_eval(self, n: int) -> bool:
        e = self.cfg.eval
        return e.do_eval and e.eval_strategy == "steps" and (n % e.eval_steps == 0 or n == self.total_steps)

    def _should_save(self, n: int, steps_per_epoch: int) -> bool:
        ckc = self.cfg.checkpoint
        if ckc.save_strategy == "no":
            return False
        if n == self.total_steps:
            return True
        if ckc.save_strategy == "epoch":
            return n % steps_per_epoch == 0
        return n % ckc.save_steps == 0

    # ---- checkpoints ---------------------------------------------------------------------------
    def save(self, n: int) -> None:
        out = self.cfg.checkpoint.output_dir
        tmp = ck.tmp_dir(out, n)
        if self.c.groups.rank == 0:
            if tmp.exists():
                import shutil

                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        barrier()
        self.c.policy.save_checkpoint(tmp / "policy")
        save_trainer_state(tmp, step=n, weight_version=self.weight_version,
                           memory=self.c.memory.state_dict() if self.c.memory is not None else None,
                           sampler=self.c.sampler.state_dict() if self.c.sampler is not None else None,
                           rank=self.c.groups.rank)
        barrier()
        if self.c.groups.rank == 0:
            path = ck.publish(out, n, {"step": n, "weight_version": self.weight_version,
                                       "world_size": self.c.groups.world_size})
            ck.enforce_limit(out, self.cfg.checkpoint.save_total_limit)
            logger.info("saved checkpoint %s", path)
        barrier()

    def _load(self, path: Path) -> None:
        self.c.policy.load_checkpoint(path / "policy")
        state = load_trainer_state(path, rank=self.c.groups.rank)
        self.start_step = state["step"]
        if self.c.memory is not None and state.get("memory") is not None:
            self.c.memory.load_state_dict(state["memory"])
        if self.c.sampler is not None and state.get("sampler") is not None:
            self.c.sampler.load_state_dict(state["sampler"])
        self.weight_version = state["weight_version"]
        self._sync_weights()  # the engine started from the HF weights; give it the resumed ones
        self.weight_version = state["weight_version"]
        logger.info("resumed from %s at step %d", path, self.start_step)


def run_training(cfg: Config, *, resume: str | None) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    trainer = Trainer(cfg, resume=resume)
    trainer.train()
