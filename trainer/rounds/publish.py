"""Publishing a finished round to the adapter store: all of it, or none of it.

Every published version's metadata names its run, round and algorithm and, for a run with central
DP, the budget spent so far (`dp`: epsilon, delta, noise multiplier, clip norm, rounds).

After `Method.aggregate` succeeded, a round produces what the method's `Behaviour` says it
publishes: the new global part (`global/adapters/<algorithm>`, or the global expert; none for a
method without one, e.g. local-only) and, for every user that took part, the adapter that user
is served (`users/<u>/served`, or their expert `users/<u>/expert`). `RoundPublisher` first
builds every one of them in memory and writes each as a PEFT directory into a staging folder,
validating each against the store's rules (rank limit, base model, finite weights). Only when
all of them staged cleanly does it publish them (each an atomic store publish; the served ones
after the global). An error while staging publishes nothing, so a crashed round leaves every
slot on its previous version.

The served adapter of user `u` is `Method.served_adapter(global_params=<new global>, state=S_u)`,
where `S_u` is what the server legitimately holds of `u`'s personal part: the personal LoRA the
client itself published to its private slot `users/<u>/personal` this round (the exact version
the client named in its reply), plus `u`'s upload (which, for PerFIT, carries its masks).
Personal tensors never travel in Flower messages; on a real device the client's personal
publish is an authenticated upload to the store rather than a filesystem write.

This module knows the store and the `Method` protocol (with its declared behaviour); nothing
about Flower messages, and nothing about any particular method.
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
from fedpersona.adapters import (
    AdapterStore,
    LoraAdapter,
    Slot,
    load_lora,
    save_lora,
    validate_adapter_dir,
)
from fedpersona.trainer.errors import PublishError
from fedpersona.trainer.flower.strategy import Participant, Published
from fedpersona.trainer.methods.base import Method, Params, Product
from fedpersona.trainer.methods.pruning import MASK_SUFFIX, unpack_sparse
from fedpersona.trainer.models.basemodel import ModelInfo

log = logging.getLogger(__name__)


def adapter_to_params(adapter: LoraAdapter) -> Params:
    return {k: t.detach().cpu().numpy().astype(np.float32) for k, t in adapter.tensors.items()}


def personal_adapter(method: Method, *, base_model: ModelInfo, state: Params) -> LoraAdapter | None:
    """The personal LoRA a client publishes to its private slot, or None if it keeps none.

    Only a method whose behaviour publishes `Product.PERSONAL` has one (PFTT's personal LoRA,
    local-only's own LoRA); other state (PerFIT's masks) is not published: the server learns
    those masks from the upload itself.
    """
    if not state or Product.PERSONAL not in method.behaviour.publishes:
        return None
    return method.personal_adapter(base_model=base_model, state=state)


def masks_from_upload(upload: Params, *, like: Params) -> Params:
    """The `<key>.mask` state a sparse upload (PerFIT, `fedpersona.trainer.methods.pruning`)
    reveals, else {}."""
    if not like or not any(k.endswith(MASK_SUFFIX) for k in upload):
        return {}
    _, masks = unpack_sparse(upload, like=like)
    return {key + MASK_SUFFIX: mask for key, mask in masks.items()}


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
        privacy: Callable[[int], dict[str, float]] | None = None,
    ) -> None:
        self.store = store
        self.method = method
        self.base_model = base_model
        self.algorithm = algorithm
        self.run_id = run_id
        self.staging_root = Path(staging_root)
        self.on_published = on_published
        self.privacy = privacy

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
        if self.privacy is not None:
            meta["dp"] = self.privacy(round_idx)
        staged: list[_Staged] = []
        behaviour = self.method.behaviour
        try:
            global_slot = behaviour.global_slot(self.algorithm)
            if global_slot is not None:
                adapter = self.method.served_adapter(
                    base_model=self.base_model, global_params=new_global, state={}
                )
                staged.append(self._write(global_slot, adapter, meta, staging))
            for p in sorted(participants, key=lambda p: p.user):
                state = {**masks_from_upload(p.upload, like=new_global), **self._personal_state(p)}
                adapter = self.method.served_adapter(
                    base_model=self.base_model, global_params=new_global, state=state
                )
                user_meta = {**meta, "user": p.user, "personal_version": p.personal_version}
                slot = behaviour.user_slot(p.user)
                staged.append(self._write(slot, adapter, user_meta, staging))
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
    store: AdapterStore, method: Method, *, user: str, base_model: ModelInfo, state: Params
) -> str | None:
    """The client's own publish of its personal LoRA to `users/<u>/personal`; the version id.

    None when the method keeps no personal LoRA. On a real device this is an authenticated
    upload to the store service, not a filesystem write; the server only ever reads it.
    """
    adapter = personal_adapter(method, base_model=base_model, state=state)
    if adapter is None:
        return None
    version = store.publish_lora(Slot.user_personal(user), adapter, metadata={"user": user})
    return version.id
