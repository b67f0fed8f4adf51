"""Pure parts of the policy package: size checks, vocabulary padding, HF config reading, micro-batching."""

from __future__ import annotations

import pytest

from megatron_ghpo.policy.batching import make_micro_batches, pack_rows, shared_rows, validate_samples
from megatron_ghpo.policy.hf_arch import hf_arch
from megatron_ghpo.policy.model import padded_vocab_size
from megatron_ghpo.policy.optimizer import OptimizerOptions
from megatron_ghpo.policy.parallel import check_parallel_sizes
from megatron_ghpo.records import TrainSample

pytestmark = pytest.mark.unit


def test_parallel_sizes_error_names_every_number() -> None:
    assert check_parallel_sizes(8, 2, 2, 16, 8, 24) == 2
    with pytest.raises(ValueError) as err:
        check_parallel_sizes(6, 4, 1, num_heads=14, num_kv_heads=2, num_layers=3)
    msg = str(err.value)
    for fragment in ("world size 6", "4 x pipeline_model_parallel_size 1 = 4", "num_attention_heads 14",
                     "num_key_value_heads 2"):  # fmt: skip
        assert fragment in msg, msg
    with pytest.raises(ValueError, match="num_hidden_layers 6 is not divisible by pipeline_model_parallel_size 2 x virtual"):
        check_parallel_sizes(2, 1, 2, num_layers=6, vpp=4)
    with pytest.raises(ValueError, match="needs pipeline_model_parallel_size > 1"):
        check_parallel_sizes(2, 2, 1, vpp=2)


@pytest.mark.parametrize(("vocab", "div", "tp", "expect"), [(500, 128, 1, 512), (512, 128, 2, 512), (513, 128, 2, 768),
                                                            (151936, 128, 4, 152064), (1, 1, 1, 1)])  # fmt: skip
def test_padded_vocab_size(vocab: int, div: int, tp: int, expect: int) -> None:
    assert padded_vocab_size(vocab, div, tp) == expect


def _cfg(**kw) -> dict:
    base = {"model_type": "qwen2", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}, "rms_norm_eps": 1e-5}  # fmt: skip
    return {**base, **kw}


def test_hf_arch_reads_both_rope_layouts() -> None:
    a = hf_arch(_cfg())
    assert (a.rope_theta, a.head_dim, a.qkv_bias, a.num_kv_heads, a.rms_norm_eps) == (1e6, 16, True, 2, 1e-5)
    legacy = _cfg(model_type="llama", rope_parameters=None, rope_theta=5e5, head_dim=32)
    b = hf_arch(legacy)
    assert (b.rope_theta, b.head_dim, b.qkv_bias) == (5e5, 32, False)


@pytest.mark.parametrize(("change", "field"), [({"model_type": "gpt2"}, "model_type"), ({"hidden_act": "gelu"}, "hidden_act"),
                                               ({"mlp_bias": True}, "mlp_bias"),
                                               ({"use_sliding_window": True, "sliding_window": 8}, "use_sliding_window"),
                                               ({"rope_parameters": {"rope_type": "yarn", "factor": 4}}, "rope_type")])  # fmt: skip
def test_hf_arch_refuses_what_it_cannot_reproduce(change: dict, field: str) -> None:
    with pytest.raises(NotImplementedError, match=field):
        hf_arch(_cfg(**change))


def _sample(p: int, c: int, mask: list[int] | None = None) -> TrainSample:
    return TrainSample(prompt_ids=list(range(10, 10 + p)), completion_ids=list(range(50, 50 + c)), advantage=1.0,
                       completion_mask=mask or [1] * c)  # fmt: skip


def test_padded_micro_batch_indexes_the_scoring_positions() -> None:
    samples = [_sample(3, 2), _sample(2, 4, [1, 1, 1, 0])]
    (mb,) = make_micro_batches(samples, micro_batch_size=2, pad_token_id=0)
    assert mb.tokens.shape == (2, 5)  # longest: 2 + 4 - 1 tokens
    assert mb.tokens[0].tolist() == [10, 11, 12, 50, 0] and mb.tokens[1].tolist() == [10, 11, 50, 51, 52]
    # completion token t of sequence i is scored at row position len(prompt) + t - 1
    assert mb.flat_index[0, :2].tolist() == [2, 3] and mb.flat_index[1].tolist() == [5 + 1, 5 + 2, 5 + 3, 5 + 4]
    assert mb.valid.tolist() == [[True, True, False, False], [True] * 4]
    assert mb.loss_mask[1].tolist() == [1, 1, 1, 0] and mb.attention_mask is None
    # the input position right after a scoring position holds the scored token (except the last one,
    # which the model never reads)
    flat = mb.tokens.reshape(-1)
    assert flat[mb.flat_index[1, :3] + 1].tolist() == mb.targets[1, :3].tolist() == [50, 51, 52]


def test_packed_row_restarts_positions_and_blocks_attention() -> None:
    samples = [_sample(2, 2), _sample(3, 1)]
    (mb,) = make_micro_batches(samples, max_tokens_per_micro_batch=8)
    assert mb.tokens.shape == (1, 3 + 3)
    assert mb.position_ids[0].tolist() == [0, 1, 2, 0, 1, 2]
    m = mb.attention_mask[0, 0]
    assert not m[4, 3] and m[4, 2] and m[1, 2], "block-diagonal causal mask (True = masked)"
    assert mb.flat_index[1, 0].item() == 3 + 2  # second sequence's first scoring position


def test_pack_rows_first_fit_decreasing_and_budget_error() -> None:
    assert pack_rows([5, 3, 4, 2], 7) == [[0, 3], [1, 2]]
    with pytest.raises(ValueError, match="sample 1 needs 9 tokens"):
        pack_rows([2, 9], 8)


def test_uniform_shape_and_multiple_padding() -> None:
    samples = [_sample(2, 2), _sample(5, 4), _sample(2, 1)]
    mbs = make_micro_batches(samples, micro_batch_size=2, uniform_shape=True, pad_to_multiple_of=4)
    assert [tuple(mb.tokens.shape) for mb in mbs] == [(2, 8), (2, 8)]
    assert mbs[1].num_sequences == 1 and (mbs[1].tokens[1] == 0).all(), "padding row carries no sequence"


def test_group_by_length_fills_micro_batches_shortest_first() -> None:
    samples = [_sample(9, 4), _sample(2, 2), _sample(8, 4), _sample(3, 1)]
    plain = make_micro_batches(samples, micro_batch_size=2)
    grouped = make_micro_batches(samples, micro_batch_size=2, group_by_length=True)
    assert [mb.sample_index for mb in plain] == [[0, 1], [2, 3]]
    assert [mb.sample_index for mb in grouped] == [[1, 3], [2, 0]]  # stable among equal lengths
    assert sum(mb.num_tokens for mb in grouped) == 2 * 3 + 2 * 12 < sum(mb.num_tokens for mb in plain) == 2 * 12 + 2 * 11
    # every sequence is laid out exactly as without grouping: same tokens, targets and scoring positions
    for mb in grouped:
        for row, i in enumerate(mb.sample_index):
            s = samples[i]
            n = len(s.prompt_ids) + len(s.completion_ids) - 1
            assert mb.tokens[row, :n].tolist() == (list(s.prompt_ids) + list(s.completion_ids))[:-1]
            assert mb.targets[row, : len(s.completion_ids)].tolist() == list(s.completion_ids)


def test_shared_prompt_rows_read_each_prompt_once_at_the_padded_positions() -> None:
    prompt_a, prompt_b = [5, 6, 7], [8, 9]
    samples = [
        TrainSample(prompt_ids=prompt_a, completion_ids=[20, 21, 22], advantage=1.0, completion_mask=[1, 1, 0]),
        TrainSample(prompt_ids=prompt_b, completion_ids=[30], advantage=0.5, completion_mask=[1]),
        TrainSample(prompt_ids=prompt_a, completion_ids=[23, 24], advantage=-1.0, completion_mask=[1, 1]),
    ]
    (mb,) = make_micro_batches(samples, micro_batch_size=8, share_prompts=True)
    assert mb.rope_positions and mb.sample_index == [0, 2, 1]
    # row 0: prompt A once, then completion 0 (20, 21) and completion 2 (23); row 1: prompt B (completion [30]
    # has no input token of its own: its only token is scored at the prompt's end)
    assert mb.tokens.tolist() == [[5, 6, 7, 20, 21, 23], [8, 9, 0, 0, 0, 0]]
    assert mb.position_ids[0].tolist() == [0, 1, 2, 3, 4, 3]  # each completion continues from the prompt's end
    assert mb.real_tokens == 6 + 2
    flat = mb.tokens.reshape(-1)
    assert mb.flat_index[0, :3].tolist() == [2, 3, 4] and mb.flat_index[1, :2].tolist() == [2, 5]
    assert mb.flat_index[2, 0].item() == 6 + 1
    assert flat[mb.flat_index[0, 1:3]].tolist() == [20, 21]  # token t is scored where token t-1 is read
    assert mb.targets.tolist() == [[20, 21, 22], [23, 24, 0], [30, 0, 0]]
    assert mb.loss_mask.tolist() == [[1, 1, 0], [1, 1, 0], [1, 0, 0]]
    m = mb.attention_mask[0, 0]  # True = masked
    assert not m[5, 0] and not m[5, 2] and not m[5, 5], "completion 2 sees the prompt and itself"
    assert m[5, 3] and m[5, 4], "completion 2 never sees completion 0"
    assert not m[4, 3] and m[2, 3], "causal inside a completion; the prompt never sees a completion"
    # padded layout of the same samples: the same targets per sequence, more input tokens
    padded = make_micro_batches(samples, micro_batch_size=8)
    assert sum(p.real_tokens for p in padded) == 5 + 2 + 4 > mb.real_tokens


def test_shared_prompt_rows_split_long_groups_and_fill_micro_batches() -> None:
    groups = [[TrainSample(prompt_ids=[g + 1] * (g + 2), completion_ids=[7] * (4 - g), advantage=0.0, completion_mask=[1] * (4 - g))
               for _ in range(3)] for g in range(3)]
    samples = [s for grp in groups for s in grp]  # rows of 11, 9 and 7 tokens (prompt g + 2, bodies 3 - g)
    mbs = make_micro_batches(samples, micro_batch_size=6, share_prompts=True)
    assert [mb.sample_index for mb in mbs] == [[0, 1, 2, 3, 4, 5], [6, 7, 8]]
    by_length = make_micro_batches(samples, micro_batch_size=4, share_prompts=True, group_by_length=True)
    assert [mb.sample_index for mb in by_length] == [[6, 7, 8], [3, 4, 5], [0, 1, 2]]
    uniform = make_micro_batches(samples, micro_batch_size=6, share_prompts=True, uniform_shape=True, pad_to_multiple_of=4)
    assert [tuple(mb.tokens.shape) for mb in uniform] == [(2, 12), (2, 12)]
    with pytest.raises(ValueError, match="share_prompts and max_tokens_per_micro_batch"):
        make_micro_batches(samples, share_prompts=True, max_tokens_per_micro_batch=64)
    # a group that does not fit a row is cut into the fewest rows of equal size that do
    eight = [TrainSample(prompt_ids=[3] * 5, completion_ids=[4] * 11, advantage=0.0, completion_mask=[1] * 11)
             for _ in range(8)]  # one row: 5 + 8 x 10 = 85 tokens
    assert shared_rows(eight, None) == [list(range(8))]
    assert shared_rows(eight, 85) == [list(range(8))]
    assert shared_rows(eight, 84) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # 45 tokens each
    assert shared_rows(eight, 30) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert shared_rows(eight, 10) == [[i] for i in range(8)]  # a single completion may exceed the budget
    (mb,) = make_micro_batches(eight, micro_batch_size=8, share_prompts=True, max_row_tokens=30)
    assert tuple(mb.tokens.shape) == (4, 25) and mb.real_tokens == 4 * 25


def test_validate_samples_names_the_row() -> None:
    with pytest.raises(ValueError, match=r"samples\[1\]\.completion_mask has 1 entries for 2"):
        validate_samples([_sample(1, 1), TrainSample(prompt_ids=[1], completion_ids=[2, 3], advantage=0.0, completion_mask=[1])])
    with pytest.raises(ValueError, match=r"samples\[0\] holds token ids \[50\] outside the vocabulary \[0, 20\)"):
        validate_samples([_sample(1, 1)], vocab_size=20)
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        validate_samples([TrainSample(prompt_ids=[], completion_ids=[1], advantage=0.0, completion_mask=[1])])


def test_optimizer_options_validation() -> None:
    with pytest.raises(ValueError, match="lr_decay_steps"):
        OptimizerOptions(lr_warmup_steps=5, lr_decay_steps=5)
    with pytest.raises(ValueError, match="min_lr"):
        OptimizerOptions(lr=1e-6, min_lr=1e-5)
