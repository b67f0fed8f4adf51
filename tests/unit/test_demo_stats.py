"""The demo's GHPO - GRPO confidence interval: paired by seed, t quantiles, binomial evaluation error."""

import math

import pytest

from megatron_ghpo.demo import paired_difference, t_quantile_975

pytestmark = pytest.mark.unit


def test_t_quantiles():
    assert t_quantile_975(1) == 12.706 and t_quantile_975(2) == 4.303 and t_quantile_975(30) == 2.042
    assert 2.0 < t_quantile_975(60) < 2.01 and abs(t_quantile_975(10_000) - 1.96) < 1e-3
    assert all(t_quantile_975(k) > t_quantile_975(k + 1) for k in range(1, 80))
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_quantile_975(0)


def test_three_seeds_by_hand():
    d = paired_difference([0.30, 0.40, 0.35], [0.20, 0.35, 0.30], 400)
    diffs = [0.10, 0.05, 0.05]
    assert d["per_seed_diff"] == pytest.approx(diffs) and d["diff"] == pytest.approx(0.2 / 3)
    sd = math.sqrt(sum((x - 0.2 / 3) ** 2 for x in diffs) / 2)
    assert d["seed_sd"] == pytest.approx(sd) and d["seed_se"] == pytest.approx(sd / math.sqrt(3))
    assert d["seed_ci95"] == pytest.approx(4.303 * sd / math.sqrt(3)) and d["ci95"] == d["seed_ci95"]
    assert d["ci95_low"] == pytest.approx(d["diff"] - d["ci95"]) and d["ci95_high"] == pytest.approx(d["diff"] + d["ci95"])
    var = (0.3 * 0.7 + 0.2 * 0.8 + 0.4 * 0.6 + 0.35 * 0.65 + 0.35 * 0.65 + 0.3 * 0.7) / 400
    assert d["eval_se"] == pytest.approx(math.sqrt(var) / 3) and d["eval_ci95"] == pytest.approx(1.96 * d["eval_se"])
    # 0.0667 > 2 * seed SE (0.0333) and > 2 * eval SE (0.0195)
    assert d["beyond_2se"] is True and d["ci95_excludes_zero"] is False  # t(0.975, 2) = 4.3 > 2
    wide = paired_difference([0.16, 0.16, 0.18], [0.04, 0.14, 0.11], 300)
    assert wide["beyond_2se"] is True and wide["ci95_low"] < 0 < wide["ci95_high"] and not wide["ci95_excludes_zero"]
    tight = paired_difference([0.30, 0.31, 0.32], [0.20, 0.20, 0.21], 1000)
    assert tight["beyond_2se"] and tight["ci95_excludes_zero"]


def test_one_seed_uses_the_evaluation_interval_and_noise_is_not_beyond_2se():
    d = paired_difference([0.5], [0.48], 300)
    assert d["seed_ci95"] is None and d["seed_se"] is None and d["ci95"] == pytest.approx(d["eval_ci95"])
    assert d["eval_se"] == pytest.approx(math.sqrt((0.25 + 0.48 * 0.52) / 300)) and d["beyond_2se"] is False
    same = paired_difference([0.2, 0.2], [0.2, 0.2], 100)
    assert same["diff"] == 0 and same["seed_sd"] == 0 and same["beyond_2se"] is False


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="same number"):
        paired_difference([0.1, 0.2], [0.1], 100)
    with pytest.raises(ValueError, match="same number"):
        paired_difference([], [], 100)
    with pytest.raises(ValueError, match="n_eval"):
        paired_difference([0.1], [0.2], 0)
    with pytest.raises(ValueError, match=r"accuracies \(a\) must be numbers in \[0, 1\]"):
        paired_difference([1.5], [0.2], 10)
