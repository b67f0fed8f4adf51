"""pass@k estimator against hand-computed values, and its properties."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from megatron_ghpo.eval.passk import default_ks, mean_pass_at_k, pass_at_k

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        # 1 - C(n-c, k) / C(n, k), worked by hand:
        (10, 3, 1, 0.3),  # c / n
        (10, 0, 5, 0.0),  # no correct sample
        (10, 10, 1, 1.0),
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (5, 2, 3, 0.9),  # 1 - C(3,3)/C(5,3) = 1 - 1/10
        (5, 2, 4, 1.0),  # n - c = 3 < k = 4: every 4-subset holds a correct sample
        (8, 3, 4, 13 / 14),  # 1 - C(5,4)/C(8,4) = 1 - 5/70
        (32, 1, 8, 0.25),  # 1 - C(31,8)/C(32,8) = 1 - 24/32
        (6, 3, 3, 0.95),  # 1 - C(3,3)/C(6,3) = 1 - 1/20
    ],
)
def test_hand_computed(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_large_n_is_stable() -> None:
    # C(10000, 5000) overflows a float; the product form does not. 1 - (9999/10000)... exact via Fraction:
    n, c, k = 10_000, 1, 100
    assert pass_at_k(n, c, k) == pytest.approx(k / n, abs=1e-12)
    value = pass_at_k(10_000, 20, 500)
    exact = 1 - Fraction(math.comb(9_980, 500), math.comb(10_000, 500))
    assert value == pytest.approx(float(exact), rel=1e-10)


@given(st.integers(1, 60).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_matches_exact_binomials(args: tuple[int, int, int]) -> None:
    n, c, k = args
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12)


@given(st.integers(2, 40).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n))))
def test_monotone_in_k_and_pass1_is_mean(args: tuple[int, int]) -> None:
    n, c = args
    values = [pass_at_k(n, c, k) for k in range(1, n + 1)]
    assert all(b >= a - 1e-12 for a, b in itertools.pairwise(values))
    assert values[0] == pytest.approx(c / n)


def test_mean_over_problems() -> None:
    # Three problems with 4 samples: pass@1 = mean(2/4, 0, 4/4) = 0.5; pass@2 = mean(5/6, 0, 1) = 11/18.
    counts = [(4, 2), (4, 0), (4, 4)]
    assert mean_pass_at_k(counts, 1) == pytest.approx(0.5)
    assert mean_pass_at_k(counts, 2) == pytest.approx(11 / 18)
    assert math.isnan(mean_pass_at_k([], 1))


def test_default_ks() -> None:
    assert default_ks(1) == [1]
    assert default_ks(8) == [1, 2, 4, 8]
    assert default_ks(32) == [1, 2, 4, 8, 16, 32]
    assert default_ks(12) == [1, 2, 4, 8, 12]


@pytest.mark.parametrize(("n", "c", "k"), [(0, 0, 1), (4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_invalid_arguments(n: int, c: int, k: int) -> None:
    with pytest.raises(ValueError, match=f"n={n}, c={c}, k={k}"):
        pass_at_k(n, c, k)
