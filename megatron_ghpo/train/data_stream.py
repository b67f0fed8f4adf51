"""Which problems each data-parallel rank trains on at each step: a pure function of the step.

The global prompt order is the concatenation of per-epoch permutations seeded by ``(seed, epoch)``;
step ``s`` takes global positions ``[s*P, (s+1)*P)`` (P = prompts per optimizer step) and DP rank
``r`` takes its contiguous slice. Because nothing but the step number is needed, the data position
saved in a checkpoint is the step itself, and a resumed run sees exactly the same prompts.
"""

from __future__ import annotations

import math
import random

from megatron_ghpo.records import Problem


class PromptStream:
    def __init__(self, problems: list[Problem], *, prompts_per_step: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 42, shuffle: bool = True):
        if not problems:
            raise ValueError("the training dataset holds no usable rows; check dataset_name and the column mapping")
        if prompts_per_step % dp_size:
            raise ValueError(f"prompts per step ({prompts_per_step}) must divide evenly over {dp_size} data-parallel ranks")
        self.problems = problems
        self.prompts_per_step = prompts_per_step
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.shuffle = seed, shuffle
        self._perms: dict[int, list[int]] = {}

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.problems) / self.prompts_per_step)

    def total_steps(self, num_train_epochs: float, max_steps: int) -> int:
        return self.count_steps(len(self.problems), self.prompts_per_step, num_train_epochs, max_steps)

    @staticmethod
    def count_steps(num_problems: int, prompts_per_step: int, num_train_epochs: float, max_steps: int) -> int:
        """Optimizer steps of a run: ``max_steps`` when set, else epochs x dataset / prompts per step."""
        if max_steps > 0:
            return max_steps
        return max(1, math.ceil(num_train_epochs * num_problems / prompts_per_step))

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            order = list(range(len(self.problems)))
            if self.shuffle:
                random.Random(f"{self.seed}:{epoch}").shuffle(order)
            self._perms = {epoch: order}  # one epoch cached at a time
        return self._perms[epoch]

    def _at(self, position: int) -> Problem:
        n = len(self.problems)
        return self.problems[self._perm(position // n)[position % n]]

    def epoch_of(self, step: int) -> float:
        return step * self.prompts_per_step / len(self.problems)

    def local_batch(self, step: int) -> list[Problem]:
        """This DP rank's prompts for optimizer step ``step`` (0-based)."""
        per_rank = self.prompts_per_step // self.dp_size
        start = step * self.prompts_per_step + self.dp_rank * per_rank
        return [self._at(start + i) for i in range(per_rank)]

    def refill(self, step: int, round_index: int, count: int) -> list[Problem]:
        """Extra prompts for dynamic sampling: a seeded draw that depends only on (step, round, rank)."""
        rng = random.Random(f"{self.seed}:refill:{step}:{round_index}:{self.dp_rank}")
        return [self.problems[rng.randrange(len(self.problems))] for _ in range(count)]
