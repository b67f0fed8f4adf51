"""SFT warm-up on the same Megatron policy: cross-entropy on worked solutions.

Each step takes the next prompts of the dataset stream; with ``sft_hint_fraction`` > 0 a share of
them carry a hint (a prefix of the worked solution, cut like GHPO cuts it) in the user turn, so the
model learns to use a hint before RL relies on it. The target of a hinted prompt is the whole worked
solution (``sft_hinted_target: solution``) or the text after the revealed beginning
(``continuation``).
The final weights are also written as a Hugging Face folder (``<output_dir>/hf``) that RL runs and
the rollout engine load directly.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from megatron_ghpo.config import Config
from megatron_ghpo.ghpo.hints import hint_prefix
from megatron_ghpo.logging_utils import get_logger, progress
from megatron_ghpo.records import TrainBatch, TrainSample
from megatron_ghpo.train import checkpointing as ck
from megatron_ghpo.train.dist_utils import barrier, broadcast_object
from megatron_ghpo.train.state import replace_hf_folder

logger = get_logger("sft")

SFT_HINT_RATIOS = (0.25, 0.5, 0.75)


def sft_target(problem, ratio: float, renderer, hinted_target: str = "solution") -> str:
    """The text a prompt is trained to produce: the worked solution (the answer when there is none), or
    for a hinted prompt with ``hinted_target="continuation"`` the part after the revealed prefix."""
    if hinted_target not in ("solution", "continuation"):
        raise ValueError(f"sft_hinted_target must be 'solution' or 'continuation', got {hinted_target!r}")
    if ratio > 0 and hinted_target == "continuation":
        shown = hint_prefix(problem.hint, ratio, split=renderer.hint_split, guard=renderer.hint_guard)
        return problem.hint[len(shown):].strip()
    return (problem.hint or problem.answer).strip()


def sft_batch(problems, renderer, tokenizer, *, step: int, seed: int, hint_fraction: float,
              max_completion_length: int, hinted_target: str = "solution") -> TrainBatch:
    """Prompt = rendered problem (sometimes hinted); target = :func:`sft_target` + EOS."""
    rng = random.Random(f"{seed}:sft:{step}")
    samples = []
    for p in problems:
        ratio = rng.choice(SFT_HINT_RATIOS) if p.hint and rng.random() < hint_fraction else 0.0
        prompt = renderer.render(p, ratio)
        target = sft_target(p, ratio, renderer, hinted_target)
        ids = tokenizer(target, add_special_tokens=False)["input_ids"][: max_completion_length - 1]
        ids = ids + [tokenizer.eos_token_id]
        samples.append(TrainSample(prompt_ids=list(prompt.token_ids), completion_ids=ids, advantage=1.0,
                                   completion_mask=[1] * len(ids)))
    return TrainBatch(samples=samples)


def run_sft(cfg: Config, *, resume: str | None) -> None:
    from transformers import AutoTokenizer

    from megatron_ghpo.data import PromptRenderer
    from megatron_ghpo.train.components import (
        build_policy,
        check_model_dir,
        hf_side_dir,
        load_training_problems,
    )
    from megatron_ghpo.train.data_stream import PromptStream
    from megatron_ghpo.train.dist_utils import build_groups
    from megatron_ghpo.train.metrics import MetricsLogger

    if resume is not None:
        raise NotImplementedError("megatron-ghpo sft --resume: SFT runs are short and restart from the model folder")
    model_dir = check_model_dir(cfg.model.model_name_or_path)
    out = Path(cfg.checkpoint.output_dir)
    if int(os.environ.get("RANK", "0")) == 0:
        ck.lock_output_dir(out)
    ck.resolve_resume(out, None, cfg.checkpoint.overwrite_output_dir)
    problems = load_training_problems(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_step = cfg.global_batch_completions(world)  # SFT: one sequence per "completion" slot
    total = PromptStream.count_steps(len(problems), per_step, cfg.training.num_train_epochs, cfg.training.max_steps)
    policy = build_policy(cfg, model_dir, total_steps=total, mode="sft")
    groups = build_groups(policy.replica_ranks(), policy.rank)
    tokenizer = AutoTokenizer.from_pretrained(hf_side_dir(model_dir))
    renderer = PromptRenderer(tokenizer, system_prompt=cfg.data.system_prompt,
                              max_prompt_length=cfg.data.max_prompt_length, hint_template=cfg.ghpo.hint_template,
                              hint_split=cfg.ghpo.hint_split, hint_guard=cfg.ghpo.hint_guard)
    stream = PromptStream(problems, prompts_per_step=per_step, dp_rank=groups.dp_rank, dp_size=groups.dp_size,
                          seed=cfg.training.seed, shuffle=cfg.data.shuffle_dataset)
    metrics = MetricsLogger(out, enabled=groups.is_logger, report_to=cfg.logging.report_to, run_name=cfg.logging.run_name,
                            wandb_project=cfg.logging.wandb_project, wandb_mode="disabled")
    for step in progress(range(total), desc="sft", total=total):
        batch = None
        if groups.is_leader:
            batch = sft_batch(stream.local_batch(step), renderer, tokenizer, step=step, seed=cfg.training.seed,
                              hint_fraction=cfg.data.sft_hint_fraction,
                              max_completion_length=cfg.rollout.max_completion_length,
                              hinted_target=cfg.data.sft_hinted_target)
        batch = broadcast_object(batch, groups)
        m = policy.sft_step(batch)
        if groups.is_logger and ((step + 1) % cfg.logging.logging_steps == 0 or step + 1 == total):
            metrics.log(step + 1, m)
    replace_hf_folder(policy, out / "hf", hf_side_dir(model_dir), groups.rank)
    barrier()
    metrics.close()
    logger.info("SFT done: %d steps; Hugging Face folder at %s", total, out / "hf")
