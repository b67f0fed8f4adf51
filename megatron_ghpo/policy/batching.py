"""TrainSamples -> model-ready micro-batches (padded per micro-batch, or packed to a token budget).

A sequence is ``prompt_ids + completion_ids``; the model reads it without its last token and the
logits at position ``j`` score token ``j + 1``, so completion token ``t`` is scored at position
``len(prompt) + t - 1``. Each micro-batch carries, for every sequence ``i`` and completion position
``t``, the flat index of that scoring position in the ``[R * S]`` logits, so the loss always sees
``[n_seq, T]`` tensors whatever the row layout:

* padded: one row per sequence, right-padded to the micro-batch's longest sequence (causal
  attention never looks right, so padding cannot change real positions);
* packed: several sequences concatenated into one row of at most ``max_tokens`` tokens, with a
  block-diagonal causal mask. RoPE is relative, so a sequence's attention scores do not depend on
  its offset in the row (up to float rounding of the rotary angles).
* shared prompts: one row per prompt (or per few of its completions, up to a row length) — the
  prompt once, then each of its completions (all but the last token), every completion attending to the prompt and causally to itself only. The logits at
  the prompt's last position score the first token of every completion. Each completion token
  keeps the position it has in ``prompt + completion`` (``position_ids``; the model must apply
  RoPE at these positions, ``MicroBatch.rope_positions``), so every log-prob equals the padded
  layout's. A group of G completions costs ``P + sum(c_i - 1)`` input tokens instead of
  ``G * P + sum(c_i - 1)``: long (e.g. hinted) prompts are read once per group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_ghpo.records import TrainSample


@dataclass(kw_only=True)
class MicroBatch:
    """One forward/backward unit. ``R`` rows of ``S`` tokens; ``n`` sequences of ≤ ``T`` completion tokens."""

    tokens: torch.Tensor
    """[R, S] int64 input ids."""
    position_ids: torch.Tensor
    """[R, S] int64 positions (restart at 0 for each packed sequence)."""
    attention_mask: torch.Tensor | None
    """[R, 1, S, S] bool, True = masked (packed rows only); None means plain causal."""
    flat_index: torch.Tensor
    """[n, T] int64: index into the flattened [R*S] positions scoring completion token t (0 where invalid)."""
    targets: torch.Tensor
    """[n, T] int64 completion token ids (0 where invalid)."""
    valid: torch.Tensor
    """[n, T] bool: t < len(completion_ids)."""
    loss_mask: torch.Tensor
    """[n, T] float32: the sample's ``completion_mask`` (0 beyond the completion)."""
    advantages: torch.Tensor
    """[n] float32."""
    old_logprobs: torch.Tensor | None
    """[n, T] float32 sampling-time log-probs, or None (on-policy: ρ ≡ 1)."""
    ref_logprobs: torch.Tensor | None
    """[n, T] float32 reference log-probs, or None."""
    rollout_logprobs: torch.Tensor | None = None
    """[n, T] float32 rollout-engine log-probs (metric only), 0 for samples without them; None if none has."""
    rollout_present: torch.Tensor | None = None
    """[n] float32: 1 for samples whose ``rollout_logprobs`` are known."""
    sample_index: list[int]
    """Position of each sequence in the batch's sample list."""
    real_tokens: int = 0
    """Input positions holding a real token (the rest is padding)."""
    rope_positions: bool = False
    """True when ``position_ids`` are not the row offsets and RoPE must use them (shared prompts)."""
    loss_weights: torch.Tensor | None = None
    """[n] float64 per-sequence loss weights fixed over the whole step
    (``megatron_ghpo.algo.losses.sequence_loss_weights``); None for forward-only passes."""

    @property
    def num_sequences(self) -> int:
        return int(self.targets.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.numel())

    def to(self, device: torch.device) -> MicroBatch:
        """A copy with every tensor on ``device``."""
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return MicroBatch(**moved)


def validate_samples(samples: Sequence[TrainSample], *, vocab_size: int | None = None, max_length: int | None = None) -> None:
    """Raise ``ValueError`` naming the sample and field for malformed input."""
    if not samples:
        raise ValueError("TrainBatch has no samples")
    for i, s in enumerate(samples):
        where = f"TrainBatch.samples[{i}]"
        if len(s.prompt_ids) == 0:
            raise ValueError(f"{where}.prompt_ids is empty (the first completion token needs a prompt to be scored)")
        if len(s.completion_ids) == 0:
            raise ValueError(f"{where}.completion_ids is empty")
        c = len(s.completion_ids)
        if len(s.completion_mask) != c:
            raise ValueError(f"{where}.completion_mask has {len(s.completion_mask)} entries for {c} completion tokens")
        for name in ("old_logprobs", "ref_logprobs", "rollout_logprobs"):
            v = getattr(s, name)
            if v is not None and len(v) != c:
                raise ValueError(f"{where}.{name} has {len(v)} entries for {c} completion tokens")
        if vocab_size is not None:
            ids = list(s.prompt_ids) + list(s.completion_ids)
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise ValueError(f"{where} holds token ids {bad[:5]} outside the vocabulary [0, {vocab_size})")
        if max_length is not None and len(s.prompt_ids) + c - 1 > max_length:
            raise ValueError(
                f"{where} is {len(s.prompt_ids) + c - 1} tokens long (prompt + completion - 1), "
                f"over the model's max_position_embeddings {max_length}"
            )


def _optional_matrix(samples: Sequence[TrainSample], name: str, idx: Sequence[int], T: int) -> torch.Tensor | None:
    present = [getattr(samples[i], name) is not None for i in idx]
    if not any(present):
        return None
    if not all(present):
        missing = [i for i, p in zip(idx, present) if not p]
        raise ValueError(f"{name} is set on some samples but missing on samples {missing[:8]}: set it on all or none")
    out = torch.zeros(len(idx), T, dtype=torch.float32)
    for r, i in enumerate(idx):
        v = getattr(samples[i], name)
        out[r, : len(v)] = torch.tensor(v, dtype=torch.float32)
    return out


def _rollout_matrix(samples: Sequence[TrainSample], idx: Sequence[int], T: int) -> dict[str, torch.Tensor | None]:
    """Engine log-probs for the ``rollout/logprob_diff`` metric; unlike ``old_logprobs`` some samples may lack
    them (a group trained on another prompt than it was sampled from)."""
    present = [samples[i].rollout_logprobs is not None for i in idx]
    if not any(present):
        return {"rollout_logprobs": None, "rollout_present": None}
    out = torch.zeros(len(idx), T, dtype=torch.float32)
    for r, i in enumerate(idx):
        v = samples[i].rollout_logprobs
        if v is not None:
            out[r, : len(v)] = torch.tensor(v, dtype=torch.float32)
    return {"rollout_logprobs": out, "rollout_present": torch.tensor(present, dtype=torch.float32)}


def _row_length(samples: Sequence[TrainSample], row: list[int]) -> int:
    return sum(len(samples[i].prompt_ids) + len(samples[i].completion_ids) - 1 for i in row)


PROMPT, PADDING = -1, -2
"""``_Canvas.owner`` values besides a sequence's index: a shared prompt, padding."""


@dataclass(kw_only=True)
class _Canvas:
    """The tensors of one micro-batch being laid out: ``R`` rows of ``S`` input positions, ``n``
    sequences of at most ``T`` completion tokens; ``owner`` says what each input position holds."""

    samples: Sequence[TrainSample]
    idx: list[int]
    S: int
    tokens: torch.Tensor
    position_ids: torch.Tensor
    owner: torch.Tensor
    flat_index: torch.Tensor
    targets: torch.Tensor
    valid: torch.Tensor
    loss_mask: torch.Tensor

    @classmethod
    def empty(cls, samples: Sequence[TrainSample], rows: list[list[int]], length_of, pad_token_id: int,
              shape: tuple[int, int] | None) -> _Canvas:  # fmt: skip
        """``shape`` = (R, S) pads to at least that many rows and tokens (extra rows are all padding)."""
        idx = [i for row in rows for i in row]
        R, S = len(rows), max(length_of(samples, row) for row in rows)
        if shape is not None:
            R, S = max(R, shape[0]), max(S, shape[1])
        n, T = len(idx), max(len(samples[i].completion_ids) for i in idx)
        return cls(
            samples=samples, idx=idx, S=S, tokens=torch.full((R, S), pad_token_id, dtype=torch.int64),
            position_ids=torch.zeros((R, S), dtype=torch.int64), owner=torch.full((R, S), PADDING, dtype=torch.int64),
            flat_index=torch.zeros((n, T), dtype=torch.int64), targets=torch.zeros((n, T), dtype=torch.int64),
            valid=torch.zeros((n, T), dtype=torch.bool), loss_mask=torch.zeros((n, T), dtype=torch.float32),
        )  # fmt: skip

    def put(self, r: int, offset: int, ids: Sequence[int], positions: torch.Tensor, owner: int) -> None:
        """Input tokens ``ids`` at row ``r`` from ``offset``, at RoPE ``positions``."""
        self.tokens[r, offset : offset + len(ids)] = torch.tensor(list(ids), dtype=torch.int64)
        self.position_ids[r, offset : offset + len(ids)] = positions
        self.owner[r, offset : offset + len(ids)] = owner

    def score(self, k: int, sample: TrainSample, flat_index: torch.Tensor) -> None:
        """Sequence ``k``'s completion tokens, scored at the given flat input positions."""
        c = len(sample.completion_ids)
        self.flat_index[k, :c] = flat_index
        self.targets[k, :c] = torch.tensor(sample.completion_ids, dtype=torch.int64)
        self.valid[k, :c] = True
        self.loss_mask[k, :c] = torch.tensor(sample.completion_mask, dtype=torch.float32)

    def finish(self, attention_mask: torch.Tensor | None, *, rope_positions: bool) -> MicroBatch:
        samples, idx, T = self.samples, self.idx, self.targets.shape[1]
        return MicroBatch(
            tokens=self.tokens, position_ids=self.position_ids, attention_mask=attention_mask,
            flat_index=self.flat_index, targets=self.targets, valid=self.valid, loss_mask=self.loss_mask,
            advantages=torch.tensor([float(samples[i].advantage) for i in idx], dtype=torch.float32),
            old_logprobs=_optional_matrix(samples, "old_logprobs", idx, T),
            ref_logprobs=_optional_matrix(samples, "ref_logprobs", idx, T),
            sample_index=idx, real_tokens=int((self.owner != PADDING).sum()), rope_positions=rope_positions,
            **_rollout_matrix(samples, idx, T),
        )  # fmt: skip


def _build(
    samples: Sequence[TrainSample], rows: list[list[int]], pad_token_id: int, shape: tuple[int, int] | None = None
) -> MicroBatch:
    """Assemble one micro-batch: ``rows`` lists the sample indices laid out in each row.

    ``shape`` = (R, S) pads to at least that many rows and tokens (rows beyond ``rows`` are all padding).
    """
    cv = _Canvas.empty(samples, rows, _row_length, pad_token_id, shape)
    k = 0
    for r, row in enumerate(rows):
        offset = 0
        for i in row:
            s = samples[i]
            seq = list(s.prompt_ids) + list(s.completion_ids)
            L, p, c = len(seq) - 1, len(s.prompt_ids), len(s.completion_ids)
            cv.put(r, offset, seq[:-1], torch.arange(L), k)
            cv.score(k, s, r * cv.S + offset + p - 1 + torch.arange(c))
            offset += L
            k += 1
    attention_mask = None
    if any(len(row) > 1 for row in rows):
        causal = torch.ones(cv.S, cv.S, dtype=torch.bool).tril()
        same = cv.owner.unsqueeze(2) == cv.owner.unsqueeze(1)
        attention_mask = ~(same & causal).unsqueeze(1)
    return cv.finish(attention_mask, rope_positions=False)


def _shared_row_length(samples: Sequence[TrainSample], row: list[int]) -> int:
    return len(samples[row[0]].prompt_ids) + sum(len(samples[i].completion_ids) - 1 for i in row)


def _build_shared(
    samples: Sequence[TrainSample], rows: list[list[int]], pad_token_id: int, shape: tuple[int, int] | None = None
) -> MicroBatch:
    """One micro-batch of shared-prompt rows: each row lists samples with identical ``prompt_ids``."""
    cv = _Canvas.empty(samples, rows, _shared_row_length, pad_token_id, shape)
    k = 0
    for r, row in enumerate(rows):
        prompt = samples[row[0]].prompt_ids
        p = len(prompt)
        cv.put(r, 0, prompt, torch.arange(p), PROMPT)
        offset = p
        for i in row:
            s = samples[i]
            body = len(s.completion_ids) - 1  # the last completion token is only a target
            cv.put(r, offset, s.completion_ids[:-1], p + torch.arange(body), k)
            # token 0 is scored at the prompt's end, token t >= 1 where token t - 1 is read
            cv.score(k, s, torch.cat([torch.tensor([r * cv.S + p - 1]), r * cv.S + offset + torch.arange(body)]))
            offset += body
            k += 1
    causal = torch.ones(cv.S, cv.S, dtype=torch.bool).tril()
    key, query = cv.owner.unsqueeze(1), cv.owner.unsqueeze(2)
    allowed = causal & ((key == PROMPT) | (key == query))
    return cv.finish(~allowed.unsqueeze(1), rope_positions=True)


def prompt_groups(samples: Sequence[TrainSample]) -> list[list[int]]:
    """Indices of samples with identical ``prompt_ids``, in order of first appearance."""
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, s in enumerate(samples):
        by_prompt.setdefault(tuple(s.prompt_ids), []).append(i)
    return list(by_prompt.values())


def shared_rows(samples: Sequence[TrainSample], max_row_tokens: int | None = None) -> list[list[int]]:
    """Prompt groups cut into rows: each group is split into the fewest rows of equal numbers of
    completions (in order) that keep every row within ``max_row_tokens`` (a single completion may
    exceed it). The attention mask is dense, so a row of S tokens costs S² attention work: a few
    completions per row read the prompt fewer times without paying for one very long row."""
    rows: list[list[int]] = []
    for group in prompt_groups(samples):
        for n in range(1, len(group) + 1):
            size = -(-len(group) // n)
            cut = [group[a : a + size] for a in range(0, len(group), size)]
            if max_row_tokens is None or size == 1 or all(_shared_row_length(samples, r) <= max_row_tokens for r in cut):
                break
        rows.extend(cut)
    return rows


def _shared_layouts(
    samples: Sequence[TrainSample], micro_batch_size: int, group_by_length: bool, max_row_tokens: int | None
) -> list[list[list[int]]]:
    """Shared rows per micro-batch: a micro-batch takes rows (in order, or by length) while it holds at
    most ``micro_batch_size`` sequences (always at least one row)."""
    rows = shared_rows(samples, max_row_tokens)
    if group_by_length:
        rows.sort(key=lambda r: _shared_row_length(samples, r))
    layouts: list[list[list[int]]] = []
    count = 0
    for row in rows:
        if layouts and count + len(row) <= micro_batch_size:
            layouts[-1].append(row)
            count += len(row)
        else:
            layouts.append([row])
            count = len(row)
    return layouts


def pack_rows(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """First-fit-decreasing: group indices so each group's total length is ≤ ``max_tokens``."""
    too_long = [(i, n) for i, n in enumerate(lengths) if n > max_tokens]
    if too_long:
        i, n = too_long[0]
        raise ValueError(
            f"sample {i} needs {n} tokens, over the packing budget max_tokens_per_micro_batch={max_tokens}; "
            f"raise the budget to at least {max(n for _, n in too_long)}"
        )
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(max_tokens - lengths[i])
    return [sorted(b) for b in bins]


def make_micro_batches(
    samples: Sequence[TrainSample],
    *,
    micro_batch_size: int = 1,
    max_tokens_per_micro_batch: int | None = None,
    pad_token_id: int = 0,
    uniform_shape: bool = False,
    pad_to_multiple_of: int = 1,
    group_by_length: bool = False,
    share_prompts: bool = False,
    max_row_tokens: int | None = None,
    loss_weights: torch.Tensor | None = None,
) -> list[MicroBatch]:
    """Split ``samples`` into micro-batches.

    Without ``max_tokens_per_micro_batch``: consecutive chunks of ``micro_batch_size`` sequences,
    each right-padded to its own longest sequence. With it: sequences packed (first-fit-decreasing)
    into single rows of at most that many tokens, one row per micro-batch. ``uniform_shape`` pads
    every micro-batch to the same [R, S] (Megatron's interleaved schedule cannot exchange
    variable shapes between virtual stages). ``pad_to_multiple_of`` rounds S up (FP8 GEMMs need
    multiples of 16 tokens, sequence parallelism a multiple of TP). ``group_by_length`` (padding
    only) fills the micro-batches with the sequences in order of length (stable), so long hinted
    prompts do not make every micro-batch pad to their length; ``MicroBatch.sample_index`` keeps
    each sequence's place in ``samples``. ``share_prompts``: rows of one prompt and its completions
    (see the module docstring), at most ``max_row_tokens`` tokens each (:func:`shared_rows`);
    micro-batches take rows of at most ``micro_batch_size`` sequences in all (at least one row).
    ``loss_weights`` ([len(samples)], in sample order) are handed to each micro-batch for its sequences.
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if loss_weights is not None and tuple(loss_weights.shape) != (len(samples),):
        raise ValueError(f"loss_weights must be [{len(samples)}] (one per sample), got {tuple(loss_weights.shape)}")
    mbs = _layout_micro_batches(samples, micro_batch_size=micro_batch_size,
                                max_tokens_per_micro_batch=max_tokens_per_micro_batch, pad_token_id=pad_token_id,
                                uniform_shape=uniform_shape, pad_to_multiple_of=pad_to_multiple_of,
                                group_by_length=group_by_length, share_prompts=share_prompts,
                                max_row_tokens=max_row_tokens)  # fmt: skip
    if loss_weights is not None:
        for mb in mbs:
            mb.loss_weights = loss_weights[torch.tensor(mb.sample_index, dtype=torch.int64)].to(torch.float64)
    return mbs


def _layout_micro_batches(
    samples: Sequence[TrainSample], *, micro_batch_size: int, max_tokens_per_micro_batch: int | None,
    pad_token_id: int, uniform_shape: bool, pad_to_multiple_of: int, group_by_length: bool, share_prompts: bool,
    max_row_tokens: int | None,
) -> list[MicroBatch]:
    """The layouts of :func:`make_micro_batches` (same arguments, no weights)."""

    def round_up(n: int) -> int:
        return -(-n // pad_to_multiple_of) * pad_to_multiple_of

    if share_prompts:
        if max_tokens_per_micro_batch is not None:
            raise ValueError("share_prompts and max_tokens_per_micro_batch (sequence packing) exclude each other; set one")
        layouts = _shared_layouts(samples, micro_batch_size, group_by_length, max_row_tokens)
        longest = max(_shared_row_length(samples, r) for rows in layouts for r in rows)
        widest = max(len(rows) for rows in layouts)
        return [
            _build_shared(samples, rows, pad_token_id, (widest, round_up(longest)) if uniform_shape
                          else (len(rows), round_up(max(_shared_row_length(samples, r) for r in rows))))
            for rows in layouts
        ]  # fmt: skip
    if max_tokens_per_micro_batch is None:
        order = list(range(len(samples)))
        if group_by_length:
            order.sort(key=lambda i: len(samples[i].prompt_ids) + len(samples[i].completion_ids))
        starts = range(0, len(samples), micro_batch_size)
        layouts = [[[i] for i in order[a : a + micro_batch_size]] for a in starts]
    else:
        lengths = [len(s.prompt_ids) + len(s.completion_ids) - 1 for s in samples]
        layouts = [[row] for row in pack_rows(lengths, max_tokens_per_micro_batch)]
    longest = max(_row_length(samples, r) for rows in layouts for r in rows)
    shapes = [
        (max(len(rows) for rows in layouts), round_up(longest)) if uniform_shape
        else (len(rows), round_up(max(_row_length(samples, r) for r in rows)))
        for rows in layouts
    ]  # fmt: skip
    return [_build(samples, rows, pad_token_id, shape) for rows, shape in zip(layouts, shapes)]
