"""The mixed reward of PFIT: `lambda_u * r_helpfulness + (1 - lambda_u) * r_safety` (pure).

A user's lambda_u, its range, default and where it is kept are the contract between the gateway
that sets it and the trainer that reads it: `fedpersona.adapters.preferences`. This module only
combines scores; it knows nothing about models, files, the service or Flower.
"""

from __future__ import annotations

import numpy as np
from fedpersona.adapters.preferences import check_reward_mix


def mixed_reward(helpfulness: np.ndarray, safety: np.ndarray, reward_mix: float) -> np.ndarray:
    """`reward_mix * helpfulness + (1 - reward_mix) * safety`, elementwise."""
    lam = check_reward_mix(reward_mix)
    return lam * np.asarray(helpfulness, dtype=np.float64) + (1.0 - lam) * np.asarray(
        safety, dtype=np.float64
    )
