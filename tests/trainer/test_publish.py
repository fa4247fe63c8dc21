"""Publishing a round: every adapter of the round or none, served = the method's composition.

Uses a real store and the real PFTT / PerFIT / local-only methods' server-side pieces (no
training: the client states and uploads are made by hand, so the expected adapters are known).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fedpersona.adapters import AdapterStore, Slot, compose, load_lora
from fedpersona.trainer.errors import PublishError
from fedpersona.trainer.flower.strategy import Participant
from fedpersona.trainer.methods import LoraSpec, get_method
from fedpersona.trainer.methods.base import Method, Params
from fedpersona.trainer.methods.pruning import apply_mask, pack_sparse
from fedpersona.trainer.models.basemodel import ModelInfo, ModelPair
from fedpersona.trainer.rounds.publish import (
    RoundPublisher,
    masks_from_upload,
    personal_adapter,
    publish_personal,
)
from flower_toy_method import ToyMethod, personal_state

RNG = np.random.default_rng(0)


def randomized(params: Params, scale: float = 0.1) -> Params:
    return {k: (RNG.standard_normal(v.shape) * scale).astype(np.float32) for k, v in params.items()}


def participant(user: str, *, upload: Params, personal_version: str | None) -> Participant:
    return Participant(
        user=user,
        node_id=1,
        num_examples=4,
        personal_version=personal_version,
        upload=upload,
        metrics={},
    )


def publisher(
    store: AdapterStore, method: Method, base: ModelInfo, tmp: Path, algo: str
) -> RoundPublisher:
    return RoundPublisher(
        store=store,
        method=method,
        base_model=base,
        algorithm=algo,
        run_id="r-20260101t000000-abcdef",
        staging_root=tmp / "staging",
    )


def test_pftt_round_publishes_global_and_exact_compositions(
    tmp_path: Path, micro_models: ModelPair
) -> None:
    base = micro_models.large
    method = get_method("pftt")
    store = AdapterStore(tmp_path / "store")
    new_global = randomized(method.init_global(base_model=base, seed=0))
    personals = {u: randomized(new_global) for u in ("alice", "bob")}
    versions = {
        u: publish_personal(store, method, user=u, base_model=base, state=s)
        for u, s in personals.items()
    }
    assert all(versions.values())
    published = publisher(store, method, base, tmp_path, "pftt")(
        3,
        new_global,
        [participant(u, upload=new_global, personal_version=versions[u]) for u in personals],
    )

    glob = load_lora(store.current(Slot.global_adapter("pftt")).path)  # type: ignore[union-attr]
    assert published.global_version == store.current(Slot.global_adapter("pftt")).id  # type: ignore[union-attr]
    for user in personals:
        served_version = store.current(Slot.user_served(user))
        assert served_version is not None and published.served_versions[user] == served_version.id
        assert served_version.metadata["round"] == 3
        served = load_lora(served_version.path)
        personal = load_lora(store.current(Slot.user_personal(user)).path)  # type: ignore[union-attr]
        assert served.r == glob.r + personal.r
        expected = compose(glob, personal)
        for key, tensor in expected.tensors.items():
            assert torch.equal(served.tensors[key], tensor), key
    assert not list((tmp_path / "staging").rglob("*.safetensors"))  # staging cleaned


def test_perfit_users_are_served_the_global_under_their_own_mask(
    tmp_path: Path, micro_models: ModelPair
) -> None:
    base = micro_models.large
    method = get_method("perfit", spec=LoraSpec(rank=2, alpha=4.0))
    store = AdapterStore(tmp_path / "store")
    new_global = randomized(method.init_global(base_model=base, seed=0))
    masks = {
        u: {k: (RNG.random(v.shape) < 0.5).astype(np.float32) for k, v in new_global.items()}
        for u in ("alice", "bob")
    }
    uploads = {u: pack_sparse(randomized(new_global), m) for u, m in masks.items()}
    assert (
        publish_personal(
            store,
            method,
            user="alice",
            base_model=base,
            state={k + ".mask": m for k, m in masks["alice"].items()},
        )
        is None
    )  # masks are no LoRA: nothing goes to the personal slot
    publisher(store, method, base, tmp_path, "perfit")(
        1, new_global, [participant(u, upload=uploads[u], personal_version=None) for u in masks]
    )
    for user, mask in masks.items():
        served = load_lora(store.current(Slot.user_served(user)).path)  # type: ignore[union-attr]
        for key, value in apply_mask(new_global, mask).items():
            np.testing.assert_array_equal(served.tensors[key].numpy(), value)
    assert masks_from_upload(uploads["bob"], like=new_global).keys() == {
        k + ".mask" for k in new_global
    }


def test_local_only_publishes_no_global_and_serves_the_own_lora(
    tmp_path: Path, micro_models: ModelPair
) -> None:
    base = micro_models.large
    method = get_method("local", spec=LoraSpec(rank=2, alpha=4.0))
    store = AdapterStore(tmp_path / "store")
    own = randomized(
        get_method("fedavg", spec=LoraSpec(rank=2, alpha=4.0)).init_global(base_model=base, seed=1)
    )
    adapter = personal_adapter(method, base_model=base, state=own)
    assert adapter is not None and adapter.alpha == 4.0
    version = publish_personal(store, method, user="alice", base_model=base, state=own)
    published = publisher(store, method, base, tmp_path, "local")(
        1, {}, [participant("alice", upload={}, personal_version=version)]
    )
    assert published.global_version is None
    assert store.current(Slot.global_adapter("local")) is None
    served = load_lora(store.current(Slot.user_served("alice")).path)  # type: ignore[union-attr]
    for key, value in own.items():
        np.testing.assert_array_equal(served.tensors[key].numpy(), value)


class FailsForBob(ToyMethod):
    def served_adapter(self, *, base_model, global_params, state):  # type: ignore[no-untyped-def]
        if state and np.all(state[next(iter(state))] == 0.25):
            raise RuntimeError("boom while composing bob's adapter")
        return super().served_adapter(
            base_model=base_model, global_params=global_params, state=state
        )


def test_a_failure_while_staging_publishes_nothing(tmp_path: Path, micro_models: ModelPair) -> None:
    base = micro_models.large
    method = FailsForBob()
    store = AdapterStore(tmp_path / "store")
    new_global = method.init_global(base_model=base, seed=0)
    ok, bad = personal_state(0.5), personal_state(0.25)
    alice = store.publish_lora(
        Slot.user_personal("alice"), method.personal_adapter(base_model=base, state=ok)
    ).id
    bob = store.publish_lora(
        Slot.user_personal("bob"), method.personal_adapter(base_model=base, state=bad)
    ).id
    with pytest.raises(PublishError, match="boom"):
        publisher(store, method, base, tmp_path, "pftt")(
            1,
            new_global,
            [
                participant("alice", upload=new_global, personal_version=alice),
                participant("bob", upload=new_global, personal_version=bob),
            ],
        )
    # alice's adapter was built before bob's failed, yet neither it nor the global is visible
    assert store.current(Slot.global_adapter("pftt")) is None
    assert store.current(Slot.user_served("alice")) is None
    assert not list((tmp_path / "staging").rglob("*.safetensors"))


def test_an_adapter_the_server_cannot_serve_publishes_nothing(
    tmp_path: Path, micro_models: ModelPair
) -> None:
    base = micro_models.large
    method = ToyMethod()
    store = AdapterStore(tmp_path / "store", max_rank=2)  # the composed rank 4 is too big
    new_global = method.init_global(base_model=base, seed=0)
    version = store.publish_lora(
        Slot.user_personal("alice"),
        method.personal_adapter(base_model=base, state=personal_state(1)),
    ).id
    with pytest.raises(PublishError, match="rank"):
        publisher(store, method, base, tmp_path, "pftt")(
            1, new_global, [participant("alice", upload=new_global, personal_version=version)]
        )
    assert store.current(Slot.global_adapter("pftt")) is None
