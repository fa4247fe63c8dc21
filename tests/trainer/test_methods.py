"""Every method's client round on the micro model: it learns, it is deterministic, it uploads
exactly what the method promises, and what it serves is what it trained."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fedpersona.adapters import LoraAdapter, compose
from fedpersona.trainer.data import personas
from fedpersona.trainer.learn.evaluate import perplexity
from fedpersona.trainer.learn.lora_train import adapter_from_params
from fedpersona.trainer.methods import LoraSpec, TrainConfig, get_method
from fedpersona.trainer.methods.base import ClientUpdate, Method
from fedpersona.trainer.methods.pruning import MASK_SUFFIX, kept, unpack_sparse
from fedpersona.trainer.models.basemodel import ModelPair

CONFIG = TrainConfig(steps=6, lr=1e-2, batch_size=4, max_len=96, seed=0)
SMALL = LoraSpec(rank=4, alpha=8.0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # The CPU is shared with other test processes; tiny models gain nothing from more threads.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def silos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("silos")
    return personas.write_silos(root, {"alice": "pirate", "bob": "robot"}, n_train=8, n_eval=4)


def _round(method: Method, model: ModelPair, silo: Path, **kwargs) -> ClientUpdate:  # type: ignore[no-untyped-def]
    args = {"global_params": {}, "state": {}, "config": CONFIG, "round_idx": 0, **kwargs}
    return method.client_update(base_model=model.large, silo=silo, **args)


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _adapter_equal(a: LoraAdapter, b: LoraAdapter) -> bool:
    return (
        (a.r, a.alpha, a.base_model) == (b.r, b.alpha, b.base_model)
        and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
        and a.tensors.keys() == b.tensors.keys()
    )


def test_unknown_method_and_options_are_refused() -> None:
    from fedpersona.trainer.errors import MethodError

    with pytest.raises(MethodError, match="unknown method"):
        get_method("fedsgd")
    with pytest.raises(MethodError, match="invalid options"):
        get_method("fedavg", rank=3)
    with pytest.raises(MethodError, match="steps"):
        TrainConfig(steps=0, lr=1e-3, batch_size=1, max_len=8, seed=0)


def test_fedavg_learns_is_deterministic_and_uploads_its_lora(
    micro_models: ModelPair, silos: dict[str, Path]
) -> None:
    method = get_method("fedavg", spec=SMALL)
    start = method.init_global(base_model=micro_models.large, seed=0)
    assert _same(start, method.init_global(base_model=micro_models.large, seed=0))
    update = _round(method, micro_models, silos["alice"], global_params=start)
    again = _round(method, micro_models, silos["alice"], global_params=start)
    assert _same(update.upload, again.upload)  # same seed -> identical tensors
    assert update.state == {}
    assert update.num_examples == 8
    assert update.upload.keys() == start.keys()
    assert all(v.dtype == np.float32 for v in update.upload.values())
    assert update.served.base_model == micro_models.large.name
    assert update.served.r == SMALL.rank
    base_ppl = perplexity(micro_models.large, None, silos["alice"], "train")
    tuned_ppl = perplexity(micro_models.large, update.served, silos["alice"], "train")
    assert tuned_ppl < base_ppl * 0.95, (base_ppl, tuned_ppl)
    assert update.metrics["train_loss_last"] < update.metrics["train_loss_first"]

    other = _round(method, micro_models, silos["bob"], global_params=start)
    new_global = method.aggregate(previous=start, results=[(update.upload, 8), (other.upload, 8)])
    for key in start:
        np.testing.assert_allclose(
            new_global[key], (update.upload[key] + other.upload[key]) / 2, atol=1e-6
        )
    served = method.served_adapter(
        base_model=micro_models.large, global_params=new_global, state={}
    )
    assert torch.equal(
        served.tensors[next(iter(new_global))], torch.from_numpy(new_global[next(iter(new_global))])
    )


def test_fedprox_term_keeps_the_update_near_the_global(
    micro_models: ModelPair, silos: dict[str, Path]
) -> None:
    method = get_method("fedavg", spec=SMALL)
    start = method.init_global(base_model=micro_models.large, seed=0)

    def drift(mu: float) -> float:
        config = dataclasses.replace(CONFIG, prox_mu=mu)
        update = _round(method, micro_models, silos["alice"], global_params=start, config=config)
        return sum(float(np.sum((update.upload[k] - start[k]) ** 2)) for k in start)

    assert drift(1000.0) < drift(0.0)
    assert get_method("fedprox").prox_mu > 0  # type: ignore[attr-defined]


def test_local_only_shares_nothing_and_keeps_its_lora(
    micro_models: ModelPair, silos: dict[str, Path]
) -> None:
    method = get_method("local", spec=SMALL)
    assert method.init_global(base_model=micro_models.large, seed=0) == {}
    first = _round(method, micro_models, silos["alice"])
    assert first.upload == {}
    assert first.state  # the user's own LoRA
    second = _round(method, micro_models, silos["alice"], state=first.state, round_idx=1)
    assert not _same(first.state, second.state)  # continued from its own state
    assert method.aggregate(previous={}, results=[(first.upload, 8)]) == {}
    served = method.served_adapter(
        base_model=micro_models.large, global_params={}, state=second.state
    )
    assert _adapter_equal(served, second.served)
    base_ppl = perplexity(micro_models.large, None, silos["alice"], "train")
    assert perplexity(micro_models.large, served, silos["alice"], "train") < base_ppl


def test_pftt_uploads_only_the_global_lora_and_serves_the_exact_composition(
    micro_models: ModelPair, silos: dict[str, Path]
) -> None:
    method = get_method("pftt")
    start = method.init_global(base_model=micro_models.large, seed=0)
    update = _round(method, micro_models, silos["alice"], global_params=start)
    # Only the global LoRA leaves the client: same keys and shapes as the global, and none of
    # its arrays is a personal tensor.
    assert update.upload.keys() == start.keys()
    assert all(update.upload[k].shape == start[k].shape for k in start)
    assert update.state.keys() == start.keys()  # the personal LoRA, kept on the client
    for personal in update.state.values():
        assert not any(np.array_equal(personal, up) for up in update.upload.values())
    # Uplink per round is at most half of FedAvg's full LoRA (default ranks 4 vs 8).
    fedavg_global = get_method("fedavg").init_global(base_model=micro_models.large, seed=0)
    assert sum(v.nbytes for v in update.upload.values()) <= 0.5 * sum(
        v.nbytes for v in fedavg_global.values()
    )
    assert _same(
        update.upload, _round(method, micro_models, silos["alice"], global_params=start).upload
    )

    spec_g, spec_p = method.global_spec, method.personal_spec  # type: ignore[attr-defined]
    other = _round(method, micro_models, silos["bob"], global_params=start)
    new_global = method.aggregate(previous=start, results=[(update.upload, 3), (other.upload, 1)])
    for key in start:
        np.testing.assert_allclose(
            new_global[key], 0.75 * update.upload[key] + 0.25 * other.upload[key], atol=1e-6
        )
    served = method.served_adapter(
        base_model=micro_models.large, global_params=new_global, state=update.state
    )
    assert served.r == spec_g.rank + spec_p.rank <= 16
    g = adapter_from_params(new_global, spec=spec_g, base_model=micro_models.large.name)
    p = adapter_from_params(update.state, spec=spec_p, base_model=micro_models.large.name)
    for module in g.modules():
        torch.testing.assert_close(served.delta(module), g.delta(module) + p.delta(module))
    assert _adapter_equal(served, compose(g, p))
    assert perplexity(micro_models.large, update.served, silos["alice"], "train") < perplexity(
        micro_models.large, None, silos["alice"], "train"
    )


def test_perfit_searches_a_mask_of_exactly_the_budget_and_keeps_it(
    micro_models: ModelPair, silos: dict[str, Path]
) -> None:
    method = get_method("perfit", spec=SMALL)  # budget rank 4, trained at rank 8
    start = method.init_global(base_model=micro_models.large, seed=0)
    budget = sum(v.size for v in start.values()) // 2
    first = _round(method, micro_models, silos["alice"], global_params=start)
    assert first.metrics["searched"] == 1.0
    masks = {k.removesuffix(MASK_SUFFIX): m for k, m in first.state.items()}
    assert masks.keys() == start.keys()
    assert kept(masks) == budget == first.metrics["kept_entries"]
    assert sum(int(t.count_nonzero()) for t in first.served.tensors.values()) <= budget
    values, upload_masks = unpack_sparse(first.upload, like=start)
    assert all(np.array_equal(upload_masks[k], masks[k]) for k in start)
    # the upload is about FedAvg's size at the budget rank: budget floats plus one bit per entry
    uplink = sum(v.nbytes for v in first.upload.values())
    assert uplink <= 4 * budget + 2 * budget // 8 + 8 * len(start)

    other = _round(method, micro_models, silos["bob"], global_params=start)
    new_global = method.aggregate(previous=start, results=[(first.upload, 8), (other.upload, 8)])
    _, other_masks = unpack_sparse(other.upload, like=start)
    for key in start:
        both = (masks[key] == 1) & (other_masks[key] == 1)
        nobody = (masks[key] == 0) & (other_masks[key] == 0)
        np.testing.assert_array_equal(new_global[key][nobody], start[key][nobody])
        only_alice = (masks[key] == 1) & (other_masks[key] == 0)
        np.testing.assert_array_equal(new_global[key][only_alice], values[key][only_alice])
        assert both.any() or nobody.any()

    second = _round(
        method,
        micro_models,
        silos["alice"],
        global_params=new_global,
        state=first.state,
        round_idx=1,
    )
    assert second.metrics["searched"] == 0.0
    assert _same(second.state, first.state)  # the architecture is the user's, kept across rounds
    served = method.served_adapter(
        base_model=micro_models.large, global_params=new_global, state=first.state
    )
    for key, tensor in served.tensors.items():
        assert not tensor[torch.from_numpy(masks[key]) == 0].any()
    assert perplexity(micro_models.large, first.served, silos["alice"], "train") < perplexity(
        micro_models.large, None, silos["alice"], "train"
    )
    again = _round(method, micro_models, silos["alice"], global_params=start)
    assert _same(again.upload, first.upload) and _same(again.state, first.state)


def test_every_method_takes_the_rank_budget_as_spec() -> None:
    from fedpersona.trainer.errors import MethodError

    budget = LoraSpec(rank=6, alpha=3.0, target_modules=("q_proj", "v_proj"))
    for name in ("fedavg", "fedprox", "local", "pftt", "perfit"):
        get_method(name, spec=budget)
    pftt = get_method("pftt", spec=budget)
    assert pftt.global_spec == LoraSpec(rank=3, alpha=1.5, target_modules=("q_proj", "v_proj"))  # type: ignore[attr-defined]
    assert pftt.personal_spec.rank == 3  # type: ignore[attr-defined]
    assert get_method("pftt", spec=budget, global_rank=2).global_spec.rank == 2  # type: ignore[attr-defined]
    assert get_method("perfit", spec=budget).expanded.rank == 12  # type: ignore[attr-defined]
    with pytest.raises(MethodError, match="exceeds the served maximum"):
        get_method("perfit", spec=LoraSpec(rank=16, alpha=32.0))
    with pytest.raises(MethodError, match="exceeds the served maximum"):
        get_method("pftt", spec=budget, personal_rank=14)
    with pytest.raises(MethodError, match="exceeds the served maximum"):
        get_method("fedavg", spec=LoraSpec(rank=32, alpha=64.0))
