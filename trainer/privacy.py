"""The privacy budget of a run with central DP: Opacus's RDP accountant for the Gaussian mechanism.

Each round, the server clips every client's update of the shared part to `clip_norm` and adds
Gaussian noise of standard deviation `dp_noise * clip_norm / n` to their unweighted mean
(`fedpersona.trainer.methods.robust.AggregationRule`): one application of the Gaussian mechanism
with noise multiplier `dp_noise` at user level (adding or removing one user's whole update).
Every connected, bound user takes part in every round, so there is no subsampling
amplification (`sample_rate` 1). After `rounds` rounds the Rényi DP at order a is
`rounds * a / (2 * dp_noise^2)`, converted to (epsilon, delta) by Opacus's `get_privacy_spent`.

Only the shared part is covered: personal parts never leave the silo and are not noised.
This module computes numbers; it does no noising itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

# Opacus's default orders (RDPAccountant.DEFAULT_ALPHAS), extended upwards for small budgets.
ORDERS: tuple[float, ...] = (
    *(1 + x / 10.0 for x in range(1, 100)),
    *(float(a) for a in range(12, 64)),
    128.0,
    256.0,
    512.0,
    1024.0,
    4096.0,
)


@dataclass(frozen=True)
class Budget:
    epsilon: float
    delta: float
    order: float


def gaussian_rdp(noise_multiplier: float, rounds: int, orders: Sequence[float]) -> list[float]:
    """The RDP of `rounds` Gaussian mechanisms (no subsampling), per order (Opacus)."""
    from opacus.accountants.analysis.rdp import compute_rdp

    rdp = compute_rdp(q=1.0, noise_multiplier=noise_multiplier, steps=rounds, orders=list(orders))
    return [float(v) for v in rdp]


def spent(
    *, noise_multiplier: float, rounds: int, delta: float, sample_rate: float = 1.0
) -> Budget:
    """(epsilon, delta) after `rounds` rounds; epsilon is inf without noise."""
    if noise_multiplier <= 0:
        return Budget(epsilon=math.inf, delta=delta, order=math.nan)
    if rounds < 1:
        return Budget(epsilon=0.0, delta=delta, order=math.nan)
    import warnings

    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    rdp = compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=rounds, orders=list(ORDERS)
    )
    with warnings.catch_warnings():  # "optimal order is the largest alpha": reported as is
        warnings.simplefilter("ignore")
        epsilon, best = get_privacy_spent(orders=list(ORDERS), rdp=rdp, delta=delta)
    return Budget(epsilon=float(epsilon), delta=delta, order=float(best))


def noise_for(*, epsilon: float, rounds: int, delta: float) -> float:
    """The smallest noise multiplier (1e-3 relative) with a budget <= epsilon after `rounds`."""
    if not epsilon > 0:
        raise ValueError(f"epsilon must be positive, got {epsilon!r}")
    if math.isinf(epsilon):
        return 0.0
    low, high = 1e-3, 1.0
    while spent(noise_multiplier=high, rounds=rounds, delta=delta).epsilon > epsilon:
        high *= 2
    while high - low > 1e-3 * high:
        mid = (low + high) / 2
        if spent(noise_multiplier=mid, rounds=rounds, delta=delta).epsilon > epsilon:
            low = mid
        else:
            high = mid
    return high
