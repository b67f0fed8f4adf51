"""Data: dataset loading with column mapping, prompt rendering, and the synthetic arithmetic task."""

from megatron_ghpo.data.answers import boxed_gold, last_boxed
from megatron_ghpo.data.loading import DatasetUnavailableError, load_problems, read_rows
from megatron_ghpo.data.prompts import PromptRenderer
from megatron_ghpo.data.synthetic import (
    DIFFICULTIES,
    SYNTHETIC_ALPHABET,
    Difficulty,
    generate_problems,
    write_jsonl,
)

__all__ = [
    "DIFFICULTIES",
    "SYNTHETIC_ALPHABET",
    "DatasetUnavailableError",
    "Difficulty",
    "PromptRenderer",
    "boxed_gold",
    "generate_problems",
    "last_boxed",
    "load_problems",
    "read_rows",
    "write_jsonl",
]
