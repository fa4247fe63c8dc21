"""Every method's client round on the micro model: it learns, it is deterministic, it uploads
exactly what the method promises, and what it serves is what it trained."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from adapters import LoraAdapter
from trainer import personas
from trainer.basemodel import ModelPair
from trainer.evaluate import perplexity
from trainer.methods import LoraSpec, TrainConfig, get_method
from trainer.methods.base import ClientUpdate, Method

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
    from trainer.errors import MethodError

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
        config = TrainConfig(**{**CONFIG.__dict__, "prox_mu": mu})
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
