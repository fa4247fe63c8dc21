"""The method registry: every list of methods is the registry's, behaviour is declared by the
method and read by the drivers (no name checks), and settings flow RoundSpec -> CLI -> run config.

Fast: no training, no Flower run (the publish test uses a real store and the micro model's name).
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fedpersona.adapters import MAX_LORA_RANK, AdapterStore, Slot, load_lora
from fedpersona.trainer.commands import eval as eval_cmd
from fedpersona.trainer.commands import train as train_cmd
from fedpersona.trainer.commands.spec_args import add_spec_arguments, spec_from_args
from fedpersona.trainer.errors import ConfigError, MethodError
from fedpersona.trainer.flower.runconfig import RunConfig, config_of
from fedpersona.trainer.flower.strategy import Participant
from fedpersona.trainer.methods import (
    BaseRole,
    Behaviour,
    LoraMethod,
    Product,
    Shares,
    behaviour_of,
    get_method,
    method_names,
    register,
    unregister,
)
from fedpersona.trainer.methods.fedavg import FedAvg
from fedpersona.trainer.models.basemodel import ModelPair
from fedpersona.trainer.rounds.publish import RoundPublisher, publish_personal
from fedpersona.trainer.rounds.records import RoundSpec, new_run_id
from flower_toy_method import ToyMethod, personal_state

REPO = Path(__file__).resolve().parents[2]
TRAINER = REPO / "trainer"
BUILT_IN = (
    "fedavg", "fedprox", "local", "pftt", "perfit", "fedpt", "fedavg-ft", "fedsa", "pfit", "fedrlhf"
)  # fmt: skip


def _parser(add: object) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add(parser)  # type: ignore[operator]
    return parser


def _choices(parser: argparse.ArgumentParser, dest: str) -> tuple[str, ...]:
    (action,) = [a for a in parser._actions if a.dest == dest]
    return tuple(action.choices or ())


# ----------------------------------------------------------------------- one list of methods


def test_the_built_in_methods_are_registered_under_their_own_names() -> None:
    assert method_names() == BUILT_IN
    for name in method_names():
        method = get_method(name)
        assert method.name == name
        # Every built-in method runs the shared client-update template, not its own copy.
        assert isinstance(method, LoraMethod)
        assert type(method).client_update is LoraMethod.client_update


def test_every_list_of_methods_is_the_registry() -> None:
    names = method_names()
    assert RoundSpec.model_json_schema()["properties"]["algorithm"]["enum"] == list(names)
    for name in names:
        assert RoundSpec(algorithm=name).algorithm == name
    assert _choices(_parser(train_cmd.add_arguments), "algorithm") == names
    served = [
        n
        for n in names
        if Product.SERVED in behaviour_of(n).publishes and not behaviour_of(n).rewards
    ]
    assert eval_cmd.evaluable_methods() == ("base", *served)
    assert _parser(eval_cmd.add_arguments).parse_args([]).methods == ("base", *served)
    # The Flower App config names every method, and lists exactly the run config's keys.
    app = (TRAINER / "flower" / "flwr_app" / "pyproject.toml").read_text()
    listed = re.search(r"^# algorithm: (.+?) \(", app, re.MULTILINE)
    assert listed is not None and tuple(listed.group(1).split(" | ")) == names
    data = tomllib.loads(app)
    config = config_of(RoundSpec(), run_id=new_run_id(), home=Path("/h"), users=("a",))
    app_config = data["tool"]["flwr"]["app"]["config"]
    assert set(app_config) == set(config.to_flower())
    # Its defaults are RoundSpec's and the run config's (TOML cannot import them).
    defaults = RunConfig.from_flower({"run-id": new_run_id(), "home": "/h", "algorithm": "pftt"})
    flat = defaults.to_flower()
    paths = {"run-id", "home", "store", "base-model", "runs-dir"}
    assert {k: v for k, v in app_config.items() if k not in paths} == {
        k: v for k, v in flat.items() if k not in paths
    }
    assert app_config["max-rank"] == MAX_LORA_RANK
    description = data["project"]["description"].lower()
    assert all(name in description for name in names)
    # The trainer docs have one row per method.
    docs = (REPO / "docs" / "trainer.md").read_text()
    for name in names:
        assert re.search(rf"^\| `{name}` \|", docs, re.MULTILINE), f"docs/trainer.md lacks {name}"


def test_declared_behaviours() -> None:
    large, small = BaseRole.LARGE, BaseRole.SMALL
    G, S, P, E = Product.GLOBAL, Product.SERVED, Product.PERSONAL, Product.EXPERTS
    expected = {
        "fedavg": (Shares.LORA, {G, S}, large),
        "fedprox": (Shares.LORA, {G, S}, large),
        "local": (Shares.NOTHING, {S, P}, large),
        "pftt": (Shares.GLOBAL_LORA, {G, S, P}, large),
        "perfit": (Shares.SPARSE_LORA, {G, S, P}, large),
        "fedpt": (Shares.LORA, {G, E}, small),
        "fedavg-ft": (Shares.LORA, {G, S, P}, large),
        "fedsa": (Shares.LORA_A, {G, S, P}, large),
    }
    for name, (shares, publishes, role) in expected.items():
        assert behaviour_of(name) == Behaviour(
            shares=shares, publishes=frozenset(publishes), base_role=role
        ), name
    assert Product.PERSONAL in get_method("fedpt", personal_steps=2).behaviour.publishes
    fedpt = behaviour_of("fedpt")
    assert fedpt.global_slot("fedpt") == Slot.global_expert()
    assert fedpt.user_slot("alice") == Slot.user_expert("alice")
    assert behaviour_of("fedprox").global_slot("fedprox") == Slot.global_adapter("fedprox")
    assert behaviour_of("local").global_slot("local") is None
    with pytest.raises(MethodError, match="exactly one"):
        Behaviour(shares=Shares.LORA, publishes=frozenset({G, S, E}), base_role=large)
    with pytest.raises(MethodError, match="small"):
        Behaviour(shares=Shares.LORA, publishes=frozenset({E}), base_role=large)


def test_register_refuses_bad_and_taken_names() -> None:
    with pytest.raises(MethodError, match="already registered"):
        register("pftt", ToyMethod)
    with pytest.raises(MethodError, match="method name"):
        register("Not A Name", ToyMethod)
    assert "Not A Name" not in method_names()


# ------------------------------------------------------------------- settings flow one way


def test_fedprox_from_the_cli_flags_into_the_run_config_and_the_clients(tmp_path: Path) -> None:
    from fedpersona.trainer.flower.apps import default_method, train_config

    argv = ["--algorithm", "fedprox", "--prox-mu", "0.05", "--rounds", "2", "--users", "a,b"]
    spec = spec_from_args(_parser(train_cmd.add_arguments).parse_args(argv))
    assert spec == RoundSpec(algorithm="fedprox", prox_mu=0.05, rounds=2, users=("a", "b"))

    config = config_of(spec, run_id=new_run_id(), home=tmp_path, users=("a", "b"))
    flat = config.to_flower()
    assert (flat["algorithm"], flat["prox-mu"], flat["rounds"]) == ("fedprox", 0.05, 2)
    assert RunConfig.from_flower({k: str(v) for k, v in flat.items()}) == config
    assert config.spec == spec and config.base_model == tmp_path / "models" / "large"

    method = default_method(config)
    assert isinstance(method, FedAvg) and method.name == "fedprox" and method.prox_mu == 0.01
    round_config = train_config(config, round_idx=1, user="a")
    assert round_config.prox_mu == 0.05 and method.proximal_mu(round_config) == 0.05
    # Without --prox-mu, FedProx uses its own coefficient.
    plain = config_of(RoundSpec(algorithm="fedprox"), run_id=new_run_id(), home=tmp_path, users=())
    assert method.proximal_mu(train_config(plain, round_idx=1, user="a")) == 0.01


def test_a_round_spec_from_the_api_reaches_the_run_config(tmp_path: Path) -> None:
    spec = RoundSpec.model_validate_json(
        json.dumps({"algorithm": "fedprox", "prox_mu": 0.2, "rank": 4, "users": ["alice"]})
    )
    config = config_of(spec, run_id=new_run_id(), home=tmp_path, users=("alice",))
    assert config.spec == spec and config.to_flower()["prox-mu"] == 0.2
    with pytest.raises(ConfigError, match="prox-mu"):
        RunConfig.from_flower({**config.to_flower(), "prox-mu": -1.0})


def test_the_existing_flag_names_still_parse() -> None:
    argv = [
        "--algorithm", "perfit", "--rounds", "3", "--users", "alice, bob", "--local-steps", "40",
        "--lr", "0.01", "--rank", "4", "--batch-size", "2", "--max-len", "64", "--seed", "7",
        "--home", "/h", "--base-model", "/m", "--store", "/s", "--runs-dir", "/r",
        "--max-rank", "32", "--cpus", "2", "--no-resume", "--json",
    ]  # fmt: skip
    args = _parser(train_cmd.add_arguments).parse_args(argv)
    assert spec_from_args(args) == RoundSpec(
        algorithm="perfit",
        rounds=3,
        users=("alice", "bob"),
        local_steps=40,
        lr=0.01,
        rank=4,
        batch_size=2,
        max_len=64,
        seed=7,
    )
    assert (args.max_rank, args.cpus, args.no_resume) == (32, 2, True)
    evaluated = _parser(eval_cmd.add_arguments).parse_args(["--methods", "base,fedprox"])
    assert evaluated.methods == ("base", "fedprox") and evaluated.rounds == 3  # eval's default
    assert not hasattr(evaluated, "algorithm")


def test_spec_flags_follow_the_model_and_refuse_bad_values() -> None:
    parser = _parser(lambda p: add_spec_arguments(p, defaults={"lr": 0.5}, exclude={"users"}))
    fields = set(RoundSpec.model_fields) - {"users"}
    assert {a.dest for a in parser._actions} - {"help"} == fields
    assert parser.parse_args([]).lr == 0.5
    with pytest.raises(ValueError):
        spec_from_args(parser.parse_args(["--rounds", "0"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["--algorithm", "fedsgd"])
    with pytest.raises(ValueError, match="not RoundSpec fields"):
        add_spec_arguments(argparse.ArgumentParser(), exclude={"roundz"})


def test_eval_honours_base_model_and_refuses_expert_methods(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spec = RoundSpec(algorithm="fedavg", users=("alice",))
    config = eval_cmd.method_run_config(
        home=tmp_path / "home",
        out=tmp_path / "out",
        run_id=new_run_id(),
        spec=spec,
        users=["alice"],
        base_model=tmp_path / "elsewhere",
    )
    assert config.base_model == tmp_path / "elsewhere"
    assert config.store == tmp_path / "out" / "fedavg" / "store" and not config.resume
    args = _parser(eval_cmd.add_arguments).parse_args(
        ["--home", str(tmp_path), "--methods", "base,fedpt"]
    )
    assert eval_cmd.run(args) == 2
    assert "fedpt" in caplog.text and "proxy" in caplog.text


# ------------------------------------------------------------------ no branching on names


@pytest.fixture
def toy_methods() -> Iterator[None]:
    class ExpertToy(ToyMethod):
        behaviour = Behaviour(
            shares=Shares.LORA,
            publishes=frozenset({Product.GLOBAL, Product.EXPERTS}),
            base_role=BaseRole.SMALL,
        )

    register("toyish", ToyMethod)
    register("toy-expert", ExpertToy)
    yield
    unregister("toyish")
    unregister("toy-expert")


def test_a_method_registered_under_a_new_name_runs_through_run_config_and_publish(
    toy_methods: None, tmp_path: Path, micro_models: ModelPair
) -> None:
    for name, role in (("toyish", "large"), ("toy-expert", "small")):
        spec = RoundSpec(algorithm=name)
        config = config_of(spec, run_id=new_run_id(), home=tmp_path, users=("alice",))
        assert config.base_model == tmp_path / "models" / role
        assert RunConfig.from_flower(config.to_flower()) == config

    base = micro_models.large
    store = AdapterStore(tmp_path / "store")
    for name in ("toyish", "toy-expert"):
        method = get_method(name)
        assert method.name == name
        new_global = method.init_global(base_model=base, seed=0)
        version = publish_personal(
            store, method, user="alice", base_model=base, state=personal_state(1.0)
        )
        publisher = RoundPublisher(
            store=store,
            method=method,
            base_model=base,
            algorithm=name,
            run_id=new_run_id(),
            staging_root=tmp_path / "staging",
        )
        participant = Participant(
            user="alice",
            node_id=1,
            num_examples=2,
            personal_version=version,
            upload=new_global,
            metrics={},
        )
        published = publisher(1, new_global, [participant])
        global_slot = method.behaviour.global_slot(name)
        user_slot = method.behaviour.user_slot("alice")
        assert global_slot is not None
        assert published.global_version == store.current(global_slot).id  # type: ignore[union-attr]
        assert published.served_versions["alice"] == store.current(user_slot).id  # type: ignore[union-attr]
        served = load_lora(store.current(user_slot).path)  # type: ignore[union-attr]
        # toyish: the global and the personal toy LoRA, composed; toy-expert keeps no personal
        # part (its behaviour does not publish one), so its expert is the global.
        assert served.r == (4 if name == "toyish" else 2)
        assert (version is None) == (name == "toy-expert")
        np.testing.assert_array_equal(
            next(iter(load_lora(store.current(global_slot).path).tensors.values())).numpy(),  # type: ignore[union-attr]
            next(iter(new_global.values())),
        )
    assert store.current(Slot.global_adapter("toyish")) is not None
    assert store.current(Slot.global_expert()) is not None
    assert store.current(Slot.user_expert("alice")) is not None
    assert store.current(Slot.user_served("alice")) is not None


def _method_name_comparisons(path: Path) -> list[str]:
    names = set(method_names())
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not isinstance(node, ast.Compare):
            continue
        for operand in (node.left, *node.comparators):
            values = (
                operand.elts if isinstance(operand, ast.Tuple | ast.List | ast.Set) else [operand]
            )
            for value in values:
                if isinstance(value, ast.Constant) and value.value in names:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: {value.value!r}")
    return found


def test_no_code_outside_the_methods_compares_a_method_name() -> None:
    outside = [p for p in TRAINER.rglob("*.py") if "methods" not in p.relative_to(TRAINER).parts]
    assert outside
    found = [hit for path in outside for hit in _method_name_comparisons(path)]
    assert found == []


# ----------------------------------------------------------------------------- imports


def test_listing_methods_loads_no_training_code() -> None:
    code = (
        "import sys\n"
        "import fedpersona.trainer.methods, fedpersona.trainer.rounds.records\n"
        "print([m for m in ('peft', 'transformers', 'flwr') if m in sys.modules])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"


def test_pretraining_does_not_import_the_model_cache() -> None:
    tree = ast.parse((TRAINER / "models" / "pretrain.py").read_text())
    imported = {
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    }
    assert "fedpersona.trainer.models.basemodel" not in imported
    assert "fedpersona.trainer.models.recipe" in imported
    recipe = ast.parse((TRAINER / "models" / "recipe.py").read_text())
    assert not [
        n
        for n in ast.walk(recipe)
        if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("fedpersona")
    ]
