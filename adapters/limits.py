"""Rank limits: the largest LoRA rank a served adapter and a proxy expert may have.

One owner for these numbers: the store refuses adapters above `MAX_LORA_RANK`, the trainer's
methods refuse to train them, and the engine is started with `--max-lora-rank` equal to it. A
deployment may raise it (to one of `VLLM_LORA_RANKS`), but the store's limit must never exceed
the engine's flag, or the store would accept adapters vLLM refuses at load time:
`check_engine_rank` is the start-up check. Pure: no I/O.
"""

from __future__ import annotations

from fedpersona.adapters.errors import RankLimitMismatch

# The largest rank of a LoRA that vLLM serves (the default deployment's --max-lora-rank).
MAX_LORA_RANK = 16

# Proxy-tuning experts are merged into the small model by the logits processor, never served by
# vLLM as LoRAs, so --max-lora-rank does not bound them; this does.
EXPERT_MAX_RANK = 64

# The values vLLM accepts for --max-lora-rank (vllm/config/lora.py); an adapter may have any
# rank up to the flag.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def check_engine_rank(*, store_max_rank: int, engine_max_lora_rank: int) -> None:
    """Refuse a store limit above the engine's `--max-lora-rank`, naming both values."""
    if engine_max_lora_rank not in VLLM_LORA_RANKS:
        raise RankLimitMismatch(
            f"the engine's --max-lora-rank {engine_max_lora_rank} is not one vLLM accepts "
            f"{VLLM_LORA_RANKS}"
        )
    if store_max_rank > engine_max_lora_rank:
        raise RankLimitMismatch(
            f"the adapter store accepts LoRA ranks up to {store_max_rank} but the engine is "
            f"started with --max-lora-rank {engine_max_lora_rank}: vLLM would refuse the "
            "larger adapters at load time; set both to the same value"
        )
