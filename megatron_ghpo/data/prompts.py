"""Prompt rendering: system prompt + user turn through the tokenizer's chat template, left-truncated."""

from __future__ import annotations

import threading
from typing import Any

from megatron_ghpo.ghpo.hints import HINT_SPLITS, HINT_TEMPLATE, hinted_problem
from megatron_ghpo.records import Problem, Prompt


class PromptRenderer:
    """Turns a :class:`Problem` (optionally with a hint) into a :class:`Prompt`.

    The messages are ``[system: system_prompt, user: user_text]`` (no system message when
    ``system_prompt`` is None), rendered with ``apply_chat_template(..., add_generation_prompt=True)``
    and tokenized without adding special tokens (the template already has them). A prompt longer than
    ``max_prompt_length`` tokens keeps its *last* ``max_prompt_length`` tokens (left truncation, as the
    reference trainer does); ``Prompt.text`` is then the decoded kept tokens and ``truncated`` is True.

    A hinted user turn is ``hinted_problem(problem, hint, ratio, template=..., split=..., guard=...)``:
    the hint stays inside the user turn and the assistant turn starts empty.

    Args:
        tokenizer: a Hugging Face tokenizer with a chat template.
        system_prompt: system message text, or None for none.
        max_prompt_length: token budget of a prompt (None = no limit).
        hint_template / hint_split / hint_guard: see :func:`megatron_ghpo.ghpo.hints.hinted_problem`.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        system_prompt: str | None,
        max_prompt_length: int | None,
        hint_template: str = HINT_TEMPLATE,
        hint_split: str = "char",
        hint_guard: bool = False,
    ) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} has no chat template; use a chat/instruct "
                "tokenizer or set tokenizer.chat_template"
            )
        if max_prompt_length is not None and (
            isinstance(max_prompt_length, bool)
            or not isinstance(max_prompt_length, int)
            or max_prompt_length < 1
        ):
            raise ValueError(f"max_prompt_length must be a positive int or None, got {max_prompt_length!r}")
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise TypeError(f"system_prompt must be a str or None, got {type(system_prompt).__name__}")
        if hint_split not in HINT_SPLITS:
            raise ValueError(f"hint_split must be one of {HINT_SPLITS}, got {hint_split!r}")
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.max_prompt_length = max_prompt_length
        self.hint_template = hint_template
        self.hint_split = hint_split
        self.hint_guard = hint_guard
        self.num_rendered = 0
        self.num_truncated = 0
        """Prompts left-truncated so far (a data-quality metric: raise max_prompt_length if it grows)."""
        self._lock = threading.Lock()

    def user_text(self, problem: Problem, hint_ratio: float = 0.0) -> str:
        """The user turn: the problem, plus the hint template and hint prefix when ``hint_ratio > 0``."""
        if hint_ratio == 0:
            return problem.problem
        if problem.hint is None:
            raise ValueError(
                f"problem {problem.uid!r} has no worked solution to hint with (hint_ratio={hint_ratio}); "
                "check data.hint_column or keep such problems out of the hint ladder"
            )
        return hinted_problem(
            problem.problem,
            problem.hint,
            hint_ratio,
            template=self.hint_template,
            split=self.hint_split,
            guard=self.hint_guard,
        )

    def messages(self, user_text: str) -> list[dict[str, str]]:
        msgs = [] if self.system_prompt is None else [{"role": "system", "content": self.system_prompt}]
        msgs.append({"role": "user", "content": user_text})
        return msgs

    def render(self, problem: Problem, hint_ratio: float = 0.0) -> Prompt:
        """Render one problem (unhinted when ``hint_ratio == 0``)."""
        user = self.user_text(problem, hint_ratio)
        text = self.tokenizer.apply_chat_template(
            self.messages(user), tokenize=False, add_generation_prompt=True
        )
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        truncated = self.max_prompt_length is not None and len(ids) > self.max_prompt_length
        if truncated:
            ids = ids[-self.max_prompt_length :]
            text = self.tokenizer.decode(ids, skip_special_tokens=False)
        with self._lock:
            self.num_rendered += 1
            self.num_truncated += truncated
        return Prompt(
            problem=problem,
            user_text=user,
            text=text,
            token_ids=ids,
            hint_ratio=float(hint_ratio),
            truncated=truncated,
        )

    def render_all(self, problems: list[Problem], hint_ratio: float = 0.0) -> list[Prompt]:
        """Render several problems at one hint ratio."""
        return [self.render(p, hint_ratio) for p in problems]
