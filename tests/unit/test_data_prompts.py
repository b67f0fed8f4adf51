"""PromptRenderer: chat template, system prompt, hints inside the user turn, left truncation."""

import pytest

from megatron_ghpo.data import PromptRenderer
from megatron_ghpo.ghpo.hints import HINT_TEMPLATE, hinted_problem
from megatron_ghpo.records import Problem

pytestmark = pytest.mark.unit

SYSTEM = "Reason step by step, then give the final answer in \\boxed{}."


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from megatron_ghpo.models.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def problem():
    return Problem(
        uid="p",
        problem="4837+2968+5-3",
        answer="7807",
        hint="4837+2968=7805\n7805+5=7810\n7810-3=7807\n\\boxed{7807}",
    )


def test_unhinted_prompt_is_the_chat_template_with_generation_prompt(tokenizer, problem):
    r = PromptRenderer(tokenizer, system_prompt=SYSTEM, max_prompt_length=512)
    p = r.render(problem)
    expected = tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": problem.problem}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert p.text == expected and p.text.endswith("<|im_start|>assistant\n")
    assert p.token_ids == tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert p.user_text == problem.problem and p.hint_ratio == 0.0 and not p.truncated
    assert p.problem is problem


def test_no_system_prompt(tokenizer, problem):
    p = PromptRenderer(tokenizer, system_prompt=None, max_prompt_length=None).render(problem)
    assert "system" not in p.text and p.text.startswith("<|im_start|>user\n4837+2968+5-3<|im_end|>")


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75, 1.0])
def test_faithful_hint_goes_inside_the_user_turn(tokenizer, problem, ratio):
    p = PromptRenderer(tokenizer, system_prompt=SYSTEM, max_prompt_length=None).render(problem, ratio)
    cut = round(len(problem.hint) * ratio)
    assert p.user_text == problem.problem + HINT_TEMPLATE + problem.hint[:cut]
    assert f"<|im_start|>user\n{p.user_text}<|im_end|>\n<|im_start|>assistant\n" in p.text
    assert p.text.endswith("<|im_start|>assistant\n")  # the assistant turn starts empty
    assert p.hint_ratio == ratio


def test_hint_options_are_forwarded(tokenizer, problem):
    r = PromptRenderer(
        tokenizer,
        system_prompt=None,
        max_prompt_length=None,
        hint_template="\nHint:\n",
        hint_split="line",
        hint_guard=True,
    )
    p = r.render(problem, 0.5)
    assert p.user_text == hinted_problem(
        problem.problem, problem.hint, 0.5, template="\nHint:\n", split="line", guard=True
    )
    assert p.user_text.endswith("4837+2968=7805\n")  # whole lines only
    assert "\\boxed" not in r.render(problem, 1.0).user_text  # guard never reveals the boxed answer


def test_left_truncation_keeps_the_end_and_counts(tokenizer, problem):
    r = PromptRenderer(tokenizer, system_prompt=SYSTEM, max_prompt_length=12)
    full = PromptRenderer(tokenizer, system_prompt=SYSTEM, max_prompt_length=None).render(problem)
    p = r.render(problem)
    assert p.truncated and len(p.token_ids) == 12 and p.token_ids == full.token_ids[-12:]
    assert p.text == tokenizer.decode(full.token_ids[-12:], skip_special_tokens=False)
    assert p.text.endswith("<|im_start|>assistant\n")
    r.render(problem)
    assert r.num_truncated == 2 and r.num_rendered == 2
    long_enough = PromptRenderer(tokenizer, system_prompt=SYSTEM, max_prompt_length=len(full.token_ids))
    assert not long_enough.render(problem).truncated and long_enough.num_truncated == 0


def test_errors(tokenizer, problem):
    no_hint = Problem(uid="nh", problem="q", answer="1")
    r = PromptRenderer(tokenizer, system_prompt=None, max_prompt_length=None)
    with pytest.raises(ValueError, match="problem 'nh' has no worked solution"):
        r.render(no_hint, 0.5)
    with pytest.raises(ValueError, match="max_prompt_length"):
        PromptRenderer(tokenizer, system_prompt=None, max_prompt_length=0)
    with pytest.raises(ValueError, match="hint_split"):
        PromptRenderer(tokenizer, system_prompt=None, max_prompt_length=None, hint_split="word")

    class NoTemplate:
        chat_template = None
        name_or_path = "plain"

    with pytest.raises(ValueError, match="'plain' has no chat template"):
        PromptRenderer(NoTemplate(), system_prompt=None, max_prompt_length=10)


@pytest.mark.parametrize("target", ["solution", "continuation"])
def test_sft_batch_targets_of_hinted_prompts(tokenizer, problem, target):
    from megatron_ghpo.train.sft import sft_batch

    r = PromptRenderer(tokenizer, system_prompt=None, max_prompt_length=None, hint_split="line")
    batch = sft_batch([problem] * 64, r, tokenizer, step=3, seed=0, hint_fraction=0.5, max_completion_length=64,
                      hinted_target=target)
    hinted = lines = 0
    for s in batch.samples:
        prompt = tokenizer.decode(s.prompt_ids)
        text = tokenizer.decode(s.completion_ids[:-1])
        assert s.completion_ids[-1] == tokenizer.eos_token_id and s.completion_mask == [1] * len(s.completion_ids)
        if HINT_TEMPLATE not in prompt:
            assert text == problem.hint
            continue
        hinted += 1
        shown = prompt.split(HINT_TEMPLATE)[1].split("<|im_end|>")[0]
        assert problem.hint.startswith(shown) and shown[-1:] in ("", "\n")  # line split: whole lines (maybe none)
        lines += shown.count("\n")
        # continuation: exactly the rest of the worked solution, so hint + completion = the solution
        assert text == (problem.hint if target == "solution" else problem.hint[len(shown):])
    assert 16 <= hinted <= 48 and lines > hinted // 2


def test_sft_target_rejects_an_unknown_mode(tokenizer, problem):
    from megatron_ghpo.train.sft import sft_target

    r = PromptRenderer(tokenizer, system_prompt=None, max_prompt_length=None)
    with pytest.raises(ValueError, match="sft_hinted_target"):
        sft_target(problem, 0.5, r, "rest")
