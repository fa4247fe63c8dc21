"""Publishing a finished round to the adapter store: all of it, or none of it.

After `Method.aggregate` succeeded, a round produces the new global adapter (slot
`global/<algorithm>`, not for local-only) and, for every user that took part, the adapter that
user is served (`users/<u>/served`). `RoundPublisher` first builds every one of them in memory
and writes each as a PEFT directory into a staging folder, validating each against the store's
rules (rank limit, base model, finite weights). Only when all of them staged cleanly does it
publish them (each an atomic store publish; the served ones after the global). An error while
staging publishes nothing, so a crashed round leaves every slot on its previous version.

The served adapter of user `u` is `Method.served_adapter(global_params=<new global>, state=S_u)`,
where `S_u` is what the server legitimately holds of `u`'s personal part: the personal LoRA the
client itself published to its private slot `users/<u>/personal` this round (the exact version
the client named in its reply), plus `u`'s upload (which, for PerFIT, carries its masks).
Personal tensors never travel in Flower messages; on a real device the client's personal
publish is an authenticated upload to the store rather than a filesystem write.

This module knows the store and the `Method` protocol; nothing about Flower messages.
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adapters import AdapterStore, LoraAdapter, Slot, load_lora, save_lora, validate_adapter_dir
from trainer.basemodel import ModelInfo
from trainer.errors import PublishError
from trainer.methods.base import Method, Params
from trainer.strategy import Participant, Published

log = logging.getLogger(__name__)

_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def lora_params(params: Params) -> Params:
    """The LoRA tensors (PEFT key names) among `params`."""
    return {k: v for k, v in params.items() if k.endswith(_LORA_SUFFIXES)}


def adapter_to_params(adapter: LoraAdapter) -> Params:
    return {k: t.detach().cpu().numpy().astype(np.float32) for k, t in adapter.tensors.items()}


def params_to_adapter(
    params: Params, *, alpha: float | None, base_model: str
) -> LoraAdapter | None:
    """A LoraAdapter holding exactly the LoRA tensors of `params` (None if it has none).

    The rank is read from the shapes; `alpha=None` means `alpha = r` (scaling 1).
    """
    tensors = {
        k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in lora_params(params).items()
    }
    if not tensors:
        return None
    ranks = {t.shape[0] for k, t in tensors.items() if k.endswith(_LORA_SUFFIXES[0])}
    if len(ranks) != 1:
        raise PublishError(f"personal LoRA has mixed ranks {sorted(ranks)}")
    rank = ranks.pop()
    targets = tuple(sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in tensors}))
    return LoraAdapter(
        r=rank,
        alpha=float(alpha if alpha is not None else rank),
        target_modules=targets,
        base_model=base_model,
        tensors=tensors,
    )


@dataclass(frozen=True)
class _Staged:
    slot: Slot
    path: Path
    metadata: dict[str, object]


class RoundPublisher:
    """Callable `(round, new_global, participants) -> Published` for `MethodStrategy`."""

    def __init__(
        self,
        *,
        store: AdapterStore,
        method: Method,
        base_model: ModelInfo,
        algorithm: str,
        run_id: str,
        staging_root: Path,
        on_published: Callable[[int, Params], None] | None = None,
    ) -> None:
        self.store = store
        self.method = method
        self.base_model = base_model
        self.algorithm = algorithm
        self.run_id = run_id
        self.staging_root = Path(staging_root)
        self.on_published = on_published

    def __call__(
        self, round_idx: int, new_global: Params, participants: list[Participant]
    ) -> Published:
        staging = self.staging_root / f"round-{round_idx}-{uuid.uuid4().hex[:8]}"
        staging.mkdir(parents=True, exist_ok=False)
        try:
            staged = self._stage(round_idx, new_global, participants, staging)
            published = self._commit(staged)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if self.on_published is not None:
            self.on_published(round_idx, new_global)
        return published

    # ------------------------------------------------------------------------------ stage

    def _stage(
        self, round_idx: int, new_global: Params, participants: list[Participant], staging: Path
    ) -> list[_Staged]:
        meta: dict[str, object] = {
            "run_id": self.run_id,
            "round": round_idx,
            "algorithm": self.algorithm,
        }
        staged: list[_Staged] = []
        try:
            if self.algorithm != "local":
                adapter = self.method.served_adapter(
                    base_model=self.base_model, global_params=new_global, state={}
                )
                staged.append(
                    self._write(Slot.global_adapter(self.algorithm), adapter, meta, staging)
                )
            for p in sorted(participants, key=lambda p: p.user):
                state = {**p.upload, **self._personal_state(p)}
                adapter = self.method.served_adapter(
                    base_model=self.base_model, global_params=new_global, state=state
                )
                user_meta = {**meta, "user": p.user, "personal_version": p.personal_version}
                staged.append(self._write(Slot.user_served(p.user), adapter, user_meta, staging))
        except PublishError:
            raise
        except Exception as e:
            raise PublishError(f"round {round_idx}: building the adapters failed: {e}") from e
        return staged

    def _personal_state(self, participant: Participant) -> Params:
        if participant.personal_version is None:
            return {}
        version = self.store.get(Slot.user_personal(participant.user), participant.personal_version)
        return adapter_to_params(load_lora(version.path))

    def _write(
        self, slot: Slot, adapter: LoraAdapter, metadata: dict[str, object], staging: Path
    ) -> _Staged:
        path = staging / slot.path.replace("/", ".")
        save_lora(adapter, path)
        validate_adapter_dir(path, max_rank=self.store.max_rank, base_model=self.base_model.name)
        return _Staged(slot=slot, path=path, metadata=json.loads(json.dumps(metadata)))

    # ----------------------------------------------------------------------------- commit

    def _commit(self, staged: list[_Staged]) -> Published:
        global_version: str | None = None
        served: dict[str, str] = {}
        for item in staged:
            metadata = dict(item.metadata)
            if global_version is not None:
                metadata["global_version"] = global_version
            version = self.store.publish(
                item.slot, item.path, base_model=self.base_model.name, metadata=metadata
            )
            if item.slot.user is None:
                global_version = version.id
            else:
                served[item.slot.user] = version.id
        log.info("published global %s and %d served adapters", global_version, len(served))
        return Published(global_version=global_version, served_versions=served)


def publish_personal(
    store: AdapterStore, *, user: str, state: Params, alpha: float | None, base_model: str
) -> str | None:
    """The client's own publish of its personal LoRA (from its state) to `users/<u>/personal`.

    Returns the version id, or None when the method keeps no personal LoRA.
    """
    adapter = params_to_adapter(state, alpha=alpha, base_model=base_model)
    if adapter is None:
        return None
    version = store.publish_lora(Slot.user_personal(user), adapter, metadata={"user": user})
    return version.id
