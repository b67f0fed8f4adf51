"""Test doubles for the GHPO sampler: scripted engines, a scripted scorer, a thread all-reduce.

The engines are real implementations of the RolloutEngine protocols that return canned
completions and log every prompt they are given; the scorer decides correctness from a script of
"the smallest hint ratio at which each problem is solved".
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import torch

from megatron_ghpo.ghpo import GHPOOptions, hinted_user_text
from megatron_ghpo.records import Completion, Group, Problem, Prompt
from megatron_ghpo.rollout.base import SamplingParams

EOS = 0
NEVER = 2.0  # a threshold no ratio reaches
NAN = "nan"


def encode(text: str) -> list[int]:
    return [ord(c) for c in text]


def decode(ids: list[int]) -> str:
    return "".join(chr(i) for i in ids)


def make_render(options: GHPOOptions):
    """render(problem, ratio) -> Prompt with a fixed chat wrapper around the hinted user turn."""

    def render(problem: Problem, ratio: float) -> Prompt:
        user = hinted_user_text(problem, ratio, options)
        text = f"<sys>S</sys><user>{user}</user><assistant>"
        return Prompt(problem=problem, user_text=user, text=text, token_ids=encode(text), hint_ratio=ratio)

    return render


def problem(uid: str, hint: str | None = "abcdefghijklmnopqrst") -> Problem:
    return Problem(uid=uid, problem=f"Problem {uid}?", answer="42", hint=hint)


class ScriptedScore:
    """Completion 0 is correct iff the group's hint ratio ≥ the problem's threshold."""

    def __init__(self, thresholds: dict[str, float | str]):
        self.thresholds = thresholds
        self.calls = 0

    def __call__(self, groups: list[Group]) -> dict[str, float]:
        self.calls += 1
        for g in groups:
            th = self.thresholds[g.prompt.problem.uid]
            n = g.size
            if th == NAN:
                g.accuracy = [None] * n
            else:
                ok = g.prompt.hint_ratio >= th  # type: ignore[operator]
                g.accuracy = [1.0 if (ok and j == 0) else 0.0 for j in range(n)]
            g.rewards = [a if a is not None else 0.0 for a in g.accuracy]
        return {"test/score_calls": 1.0}


def _completions(n: int) -> list[Completion]:
    return [
        Completion(
            token_ids=[10 + j, 11, EOS], text=f"c{j}", logprobs=[-0.1, -0.2, -0.3], finish_reason="stop"
        )
        for j in range(n)
    ]


class ScriptedEngine:
    """Batched engine: records each generate call's decoded prompts."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> list[list[Completion]]:
        self.calls.append([decode(p) for p in prompt_token_ids])
        return [_completions(sampling.n) for _ in prompt_token_ids]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        raise NotImplementedError("ScriptedEngine has no weights")

    @property
    def weight_version(self) -> int:
        return 0

    def sleep(self) -> None:
        pass

    def wake(self) -> None:
        pass

    def close(self) -> None:
        pass


class StreamingScriptedEngine(ScriptedEngine):
    """Streaming engine finishing one request per poll, newest first (so order differs from submission)."""

    def __init__(self) -> None:
        super().__init__()
        self.queue: list[tuple[str, list[int], int]] = []
        self.log: list[str] = []  # "submit <rid>" / "done <rid>" in event order

    def submit(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams) -> None:
        self.queue.append((request_id, list(prompt_token_ids), sampling.n))
        self.log.append(f"submit {request_id}")

    def poll(self) -> list[tuple[str, list[Completion]]]:
        if not self.queue:
            return []
        rid, ids, n = self.queue.pop()
        self.calls.append([decode(ids)])
        self.log.append(f"done {rid}")
        return [(rid, _completions(n))]

    def has_pending(self) -> bool:
        return bool(self.queue)


class ThreadCollective:
    """All-reduce / all-gather between threads that stand in for data-parallel ranks.

    A rank that makes a call the others never make breaks the barrier after ``timeout`` seconds
    (the test fails instead of hanging).
    """

    def __init__(self, world: int, timeout: float = 10.0):
        self.world = world
        self.barrier = threading.Barrier(world, timeout=timeout)
        self.slots: list[object] = [None] * world
        self.calls = [0] * world

    def any_global(self, rank: int):
        def call(flag: bool) -> bool:
            return any(self._exchange(rank, bool(flag)))

        return call

    def gather(self, rank: int):
        return lambda obj: self._exchange(rank, obj)

    def _exchange(self, rank: int, value: object) -> list:
        self.slots[rank] = value
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()
        self.calls[rank] += 1
        return out


def run_in_threads(rank_main, world: int, timeout: float = 60.0) -> None:
    """Run ``rank_main(rank)`` for every rank in its own thread; fail on a hang or an exception."""
    errors: list[BaseException] = []

    def guarded(rank: int) -> None:
        try:
            rank_main(rank)
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    assert not errors, errors
