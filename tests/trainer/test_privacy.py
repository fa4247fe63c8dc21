"""The central-DP budget: Opacus's RDP accountant, checked against closed forms.

For the Gaussian mechanism with noise multiplier s (no subsampling), the RDP at order a after T
rounds is T a / (2 s^2) (Mironov 2017, Prop. 7), and with the classic conversion
eps = min_a T a / (2 s^2) + log(1/delta) / (a - 1), minimised over real a, the bound is
T / (2 s^2) + sqrt(2 T log(1/delta)) / s. The accountant's (tighter) conversion must stay below
that bound and above the exact privacy curve of the Gaussian mechanism (Balle & Wang 2018).
"""

from __future__ import annotations

import math

import pytest
from fedpersona.trainer.privacy import ORDERS, gaussian_rdp, noise_for, spent


def exact_gaussian_delta(eps: float, mu: float) -> float:
    """delta(eps) of a Gaussian mechanism with mu = sensitivity / sigma (composed: sqrt(T)/s)."""

    def phi(x: float) -> float:
        return 0.5 * (1 + math.erf(x / math.sqrt(2)))

    return phi(-eps / mu + mu / 2) - math.exp(eps) * phi(-eps / mu - mu / 2)


@pytest.mark.parametrize(("sigma", "rounds"), [(1.0, 1), (1.0, 10), (4.0, 50), (0.7, 3)])
def test_rdp_is_the_gaussian_closed_form(sigma: float, rounds: int) -> None:
    for order, value in zip(ORDERS, gaussian_rdp(sigma, rounds, ORDERS), strict=True):
        assert value == pytest.approx(rounds * order / (2 * sigma**2), rel=1e-9)


@pytest.mark.parametrize(
    ("sigma", "rounds", "delta"), [(1.0, 10, 1e-5), (4.0, 50, 1e-5), (10.0, 20, 1e-6)]
)
def test_epsilon_lies_between_the_exact_curve_and_the_classic_bound(
    sigma: float, rounds: int, delta: float
) -> None:
    budget = spent(noise_multiplier=sigma, rounds=rounds, delta=delta)
    classic = rounds / (2 * sigma**2) + math.sqrt(2 * rounds * math.log(1 / delta)) / sigma
    assert budget.epsilon <= classic * 1.001
    # The exact (eps, delta) curve: at the accountant's eps, the true delta is at most delta.
    mu = math.sqrt(rounds) / sigma
    assert exact_gaussian_delta(budget.epsilon, mu) <= delta
    # ...and the accountant is not uselessly loose: within 30% of the exact eps.
    low, high = 0.0, budget.epsilon
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if exact_gaussian_delta(mid, mu) > delta else (low, mid)
    assert budget.epsilon <= 1.3 * high


def test_budget_grows_with_rounds_and_shrinks_with_noise() -> None:
    e = [spent(noise_multiplier=2.0, rounds=t, delta=1e-5).epsilon for t in (1, 5, 25)]
    assert e[0] < e[1] < e[2]
    assert spent(noise_multiplier=4.0, rounds=5, delta=1e-5).epsilon < e[1]
    assert math.isinf(spent(noise_multiplier=0.0, rounds=5, delta=1e-5).epsilon)


def test_noise_for_a_target_epsilon() -> None:
    for target in (1.0, 8.0):
        sigma = noise_for(epsilon=target, rounds=10, delta=1e-5)
        assert spent(noise_multiplier=sigma, rounds=10, delta=1e-5).epsilon <= target
        assert spent(noise_multiplier=sigma * 0.99, rounds=10, delta=1e-5).epsilon > target * 0.98
    assert noise_for(epsilon=math.inf, rounds=10, delta=1e-5) == 0.0
