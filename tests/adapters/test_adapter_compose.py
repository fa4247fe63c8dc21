"""`compose(global, personal)` is exact: one LoRA whose effect equals both applied together.

The law is checked on tensors with Hypothesis (random ranks, alphas, target-module sets and
layers, including modules only one side targets), and on a real tiny Llama where PEFT applies
the global and personal adapters as two simultaneously active adapters and, separately, the
composed adapter loaded from the PEFT files `save_lora` wrote (and the store published).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from factories_adapters import (
    BASE,
    LAYERS,
    TARGETS,
    logits,
    make_adapter,
    module_path,
    random_tokens,
    tiny_llama,
    with_deltas,
)
from fedpersona.adapters import (
    AdapterStore,
    InvalidAdapter,
    LoraAdapter,
    Slot,
    compose,
    save_lora,
    validate_adapter_dir,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import PeftModel

TOLERANCE = 1e-5


@st.composite
def adapters(
    draw: st.DrawFn, *, seed: int, dtype: torch.dtype = torch.float32, scalings: list[float]
) -> LoraAdapter:
    r = draw(st.sampled_from([1, 2, 3, 4, 8, 16]))
    return make_adapter(
        seed=seed,
        r=r,
        targets=sorted(draw(st.sets(st.sampled_from(TARGETS), min_size=1))),
        layers=sorted(draw(st.sets(st.sampled_from(range(LAYERS)), min_size=1))),
        alpha=r * draw(st.sampled_from(scalings)),
        scale=draw(st.sampled_from([0.01, 0.03, 0.05])),
        dtype=dtype,
    )


def check_law(g: LoraAdapter, p: LoraAdapter, *, input_seed: int, tolerance: float) -> None:
    composed = compose(g, p)
    assert composed.r == g.r + p.r
    assert composed.alpha == composed.r
    assert composed.scaling == 1.0
    assert set(composed.target_modules) == set(g.target_modules) | set(p.target_modules)
    assert set(composed.modules()) == set(g.modules()) | set(p.modules())
    dtype = composed.modules()[next(iter(composed.modules()))][0].dtype
    gen = torch.Generator().manual_seed(input_seed)
    sides = [(side.scaling, side.modules()) for side in (g, p)]
    for module, (a, b) in composed.modules().items():
        x = torch.randn(5, a.shape[1], generator=gen, dtype=dtype)
        # what a LoRA layer computes for the composed adapter: s * B(A x), s = 1 here
        got = (x @ a.T) @ b.T * composed.scaling
        want = torch.zeros(5, b.shape[0], dtype=dtype)
        for scaling, modules in sides:
            if module in modules:
                side_a, side_b = modules[module]
                want += scaling * ((x @ side_a.T) @ side_b.T)
        assert (got - want).abs().max().item() < tolerance, module
        assert want.abs().max().item() > 0  # not vacuous: random updates are never zero


# Realistic scalings (alpha = r/2 .. 2r) keep float32 updates O(1), where 1e-5 is meaningful.
@settings(max_examples=30, deadline=None)
@given(
    g=adapters(seed=1, scalings=[0.5, 1.0, 2.0]),
    p=adapters(seed=2, scalings=[0.5, 1.0, 2.0]),
    input_seed=st.integers(0, 2**16),
)
def test_composed_update_equals_the_sum_of_the_updates(
    g: LoraAdapter, p: LoraAdapter, input_seed: int
) -> None:
    check_law(g, p, input_seed=input_seed, tolerance=TOLERANCE)


# In float64 the law holds to rounding for any scaling, large ones included.
@settings(max_examples=20, deadline=None)
@given(
    g=adapters(seed=3, dtype=torch.float64, scalings=[0.1, 1.0, 16.0, 64.0]),
    p=adapters(seed=4, dtype=torch.float64, scalings=[0.1, 1.0, 16.0, 64.0]),
    input_seed=st.integers(0, 2**16),
)
def test_composition_law_in_float64(g: LoraAdapter, p: LoraAdapter, input_seed: int) -> None:
    check_law(g, p, input_seed=input_seed, tolerance=1e-9)


def test_compose_is_bilinear_in_order() -> None:
    g, p = make_adapter(seed=1, r=2), make_adapter(seed=2, r=3)
    module = module_path(0, "q_proj")
    forward, backward = compose(g, p), compose(p, g)
    assert torch.allclose(forward.delta(module), backward.delta(module), atol=1e-6)
    # the global adapter's components come first
    assert torch.equal(forward.modules()[module][0][:2], g.modules()[module][0])


def test_module_only_one_side_targets_gets_zero_padding() -> None:
    g = make_adapter(seed=1, r=2, targets=("q_proj",))
    p = make_adapter(seed=2, r=3, targets=("down_proj",), layers=[1])
    composed = compose(g, p)
    a, b = composed.modules()[module_path(1, "down_proj")]
    assert a.shape == (5, 256) and b.shape == (128, 5)
    assert torch.count_nonzero(a[:2]) == 0 and torch.count_nonzero(b[:, :2]) == 0
    assert torch.allclose(
        composed.delta(module_path(1, "down_proj")), p.delta(module_path(1, "down_proj"))
    )


def test_compose_refuses_different_base_models() -> None:
    with pytest.raises(InvalidAdapter, match="different base models"):
        compose(make_adapter(seed=1, r=2), make_adapter(seed=2, r=2, base_model="other"))


def test_compose_refuses_disagreeing_shapes() -> None:
    g = make_adapter(seed=1, r=2, targets=("q_proj",), layers=[0])
    key_a, key_b = (f"{module_path(0, 'q_proj')}.lora_{x}.weight" for x in "AB")
    p = LoraAdapter(
        r=2,
        alpha=2,
        target_modules=("q_proj",),
        base_model=BASE,
        tensors={key_a: torch.ones(2, 64), key_b: torch.ones(128, 2)},
    )
    with pytest.raises(InvalidAdapter, match="disagree on its"):
        compose(g, p)


# PEFT wraps a target module in every layer and warns about layers an adapter has no weights
# for; those keep PEFT's zero-initialised B, i.e. no update, which is what the adapter means.
@pytest.mark.filterwarnings("ignore:Found missing adapter keys")
@pytest.mark.parametrize(
    ("r_g", "targets_g", "r_p", "targets_p", "layers_p"),
    [
        (2, ("q_proj", "v_proj"), 2, ("q_proj", "v_proj"), (0, 1)),
        (
            8,
            ("q_proj", "k_proj", "v_proj", "o_proj"),
            1,
            ("gate_proj", "up_proj", "down_proj"),
            (0, 1),
        ),
        (4, ("q_proj", "down_proj"), 8, ("v_proj", "down_proj", "o_proj"), (1,)),
        (1, TARGETS, 4, ("up_proj",), (0,)),
    ],
)
def test_composed_adapter_served_by_peft_equals_both_adapters(
    tmp_path: Path,
    r_g: int,
    targets_g: tuple[str, ...],
    r_p: int,
    targets_p: tuple[str, ...],
    layers_p: tuple[int, ...],
) -> None:
    g = make_adapter(seed=10 + r_g, r=r_g, targets=targets_g, alpha=16.0, scale=0.1)
    p = make_adapter(seed=20 + r_p, r=r_p, targets=targets_p, layers=layers_p, alpha=4.0, scale=0.1)
    save_lora(g, tmp_path / "global")
    save_lora(p, tmp_path / "personal")
    store = AdapterStore(tmp_path / "store", max_rank=16)
    served = store.publish_lora(Slot.user_served("alice"), compose(g, p), metadata={"round": 1})
    validate_adapter_dir(served.path, max_rank=r_g + r_p, base_model=BASE)

    both: Any = PeftModel.from_pretrained(tiny_llama(), tmp_path / "global", adapter_name="global")
    both.load_adapter(tmp_path / "personal", adapter_name="personal")
    both.base_model.set_adapter(["global", "personal"])  # both active at once
    composed = PeftModel.from_pretrained(tiny_llama(), served.path).eval()
    base, only_global = tiny_llama(), with_deltas(tiny_llama(), g)

    for seed in range(2):
        tokens = random_tokens(seed, batch=3, length=16)
        want = logits(both.eval(), tokens)
        got = logits(composed, tokens)
        assert (got - want).abs().max().item() < TOLERANCE
        assert (got - logits(with_deltas(base, g, p), tokens)).abs().max().item() < TOLERANCE
        # both sides matter, so the comparison is not vacuous
        assert (got - logits(base, tokens)).abs().max().item() > 1e-3
        assert (got - logits(only_global, tokens)).abs().max().item() > 1e-4
