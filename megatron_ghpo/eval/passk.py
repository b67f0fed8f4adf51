"""pass@k: the unbiased estimator over n samples with c correct, and per-task aggregates.

``pass@k = 1 - C(n - c, k) / C(n, k)`` is the probability that at least one of k samples drawn
without replacement from the n is correct. It is evaluated as the product
``prod_{i = n-c+1}^{n} (1 - k / i)`` so no binomial coefficient is ever formed (no overflow for
n in the thousands, no catastrophic cancellation). For k = 1 it equals c / n, so the mean of
pass@1 over problems is the mean correctness over all K samples ("avg@K").
"""

from __future__ import annotations

from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimate for one problem with ``n`` samples of which ``c`` are correct."""
    if n < 1 or k < 1:
        raise ValueError(f"pass_at_k(n={n}, c={c}, k={k}): n and k must be >= 1")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k(n={n}, c={c}, k={k}): c must be in [0, n]")
    if k > n:
        raise ValueError(f"pass_at_k(n={n}, c={c}, k={k}): k must be <= n (draw more samples or lower k)")
    if n - c < k:
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def default_ks(n: int) -> list[int]:
    """k values reported for n samples: 1, the powers of two below n, and n itself."""
    if n < 1:
        raise ValueError(f"default_ks(n={n}): n must be >= 1")
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    ks.append(n)
    return ks


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """Mean over problems of pass@k, given one ``(n, c)`` pair per problem; NaN for no problems."""
    if not counts:
        return float("nan")
    return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)
