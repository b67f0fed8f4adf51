"""Turn scored groups into the policy's TrainBatch."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from megatron_ghpo.algo.losses import completion_mask
from megatron_ghpo.records import Group, TrainBatch, TrainSample


def group_rewards(groups: list[Group]) -> torch.Tensor:
    """Float32 [num_groups, G] of total rewards (None → NaN; advantages treat NaN as 0)."""
    if not groups:
        return torch.zeros((0, 0), dtype=torch.float32)
    sizes = {g.size for g in groups}
    if len(sizes) != 1:
        raise ValueError(
            f"groups have different sizes {sorted(sizes)}; every group must hold num_generations completions"
        )
    rows = []
    for g in groups:
        if len(g.rewards) != g.size:
            raise ValueError(
                f"group of problem {g.prompt.problem.uid!r} has {len(g.rewards)} rewards for {g.size} completions"
            )
        rows.append([math.nan if r is None else float(r) for r in g.rewards])
    return torch.tensor(rows, dtype=torch.float32)


def build_train_batch(
    groups: list[Group],
    advantages: torch.Tensor | Sequence[Sequence[float]],
    *,
    eos_token_id: int | Sequence[int],
    mask_truncated_completions: bool = False,
) -> TrainBatch:
    """One TrainSample per completion: prompt ids of the *trained* prompt, completion ids, advantage,
    completion mask (up to and including the first EOS; whole completion masked when it was
    truncated and ``mask_truncated_completions``) and the engine's log-probs as ``old_logprobs``
    (None when the group is trained on a prompt other than the one it was sampled from).

    ``advantages`` is [num_groups, G]. Samples come group by group, in order, so each group's G
    completions are consecutive (``bnpo``'s normalisation unit in the seed recipe).
    """
    adv = torch.as_tensor(advantages, dtype=torch.float32)
    if adv.dim() != 2 or adv.shape[0] != len(groups):
        raise ValueError(f"advantages must be [num_groups={len(groups)}, G], got {tuple(adv.shape)}")
    samples: list[TrainSample] = []
    for gi, g in enumerate(groups):
        if adv.shape[1] != g.size:
            raise ValueError(
                f"advantages have {adv.shape[1]} columns but group {gi} has {g.size} completions"
            )
        ids = [c.token_ids for c in g.completions]
        mask = completion_mask(
            ids,
            eos_token_id,
            truncated=[c.truncated for c in g.completions],
            mask_truncated_completions=mask_truncated_completions,
        )
        prompt_ids = list(g.trained_prompt.token_ids)
        # Engine log-probs belong to the sampling prompt; a group trained on another prompt (faithful
        # mode's reverted groups) gets None, i.e. ratio 1 against the current policy (as the reference).
        same_prompt = g.trained_prompt is g.prompt or g.trained_prompt.token_ids == g.prompt.token_ids
        for ci, c in enumerate(g.completions):
            if c.logprobs is not None and len(c.logprobs) != len(c.token_ids):
                raise ValueError(
                    f"completion {ci} of group {gi} has {len(c.logprobs)} log-probs for {len(c.token_ids)} tokens"
                )
            row = mask[ci, : len(c.token_ids)].tolist()
            samples.append(
                TrainSample(
                    prompt_ids=prompt_ids,
                    completion_ids=list(c.token_ids),
                    advantage=float(adv[gi, ci]),
                    completion_mask=row,
                    old_logprobs=list(c.logprobs) if (c.logprobs is not None and same_prompt) else None,
                    group_index=gi,
                )
            )
    return TrainBatch(samples=samples)
