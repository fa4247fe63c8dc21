"""The Flower run config and node config of a fedpersona run, parsed once into dataclasses.

Flower hands a ServerApp/ClientApp flat `{str: scalar}` mappings (`context.run_config`,
`context.node_config`). Everything the apps need is read here, with defaults resolved against
the home directory, so no code deeper down looks up `run_config["..."]` by itself. Settings flow
one way: a `RoundSpec` (what to train: the API's JSON, the CLI's flags) becomes `RunConfig.spec`,
next to where this run lives (`home`, `store`, `base_model`, `runs_dir`) and how it waits for
nodes; `to_flower` flattens both into the keys of the Deployment Engine app's
`[tool.flwr.app.config]` (`trainer/flower/flwr_app/pyproject.toml`), and `from_flower` parses
them back (pydantic validates the spec's part). The base model defaults to
`<home>/models/<role>`, the role the method's behaviour declares.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from fedpersona.adapters import InvalidName, validate_user_id
from fedpersona.adapters.limits import MAX_LORA_RANK
from fedpersona.trainer.errors import ConfigError, MethodError
from fedpersona.trainer.methods import behaviour_of
from fedpersona.trainer.rounds.records import RoundSpec, check_run_id
from pydantic import ValidationError

Scalar = bool | int | float | str | bytes


@dataclass(frozen=True)
class RunConfig:
    """Settings of one run, identical on the server and on every client."""

    run_id: str
    spec: RoundSpec
    home: Path
    store: Path
    base_model: Path
    runs_dir: Path
    max_rank: int = MAX_LORA_RANK
    min_nodes: int = 0
    round_timeout: float = 3600.0
    resume: bool = True
    # The operator's node -> users bindings (`fedpersona.trainer.flower.identity.NodeBindings`);
    # set on the Deployment Engine, where the SuperLink authenticates node ids. None: unbound.
    node_bindings: Path | None = None

    def __post_init__(self) -> None:
        check_run_id(self.run_id)
        if self.max_rank < 1:
            raise ConfigError(f"max_rank must be at least 1, got {self.max_rank}")
        if self.min_nodes < 0:
            raise ConfigError(f"min_nodes must be >= 0, got {self.min_nodes}")
        if not self.round_timeout > 0:
            raise ConfigError(f"round_timeout must be positive, got {self.round_timeout}")

    @property
    def users(self) -> tuple[str, ...]:
        """The users this run trains (its spec names them; empty: the SuperNodes say)."""
        return self.spec.users or ()

    @property
    def expected_nodes(self) -> int:
        """How many SuperNodes a round waits for."""
        return self.min_nodes or len(self.users) or 1

    @classmethod
    def from_flower(cls, config: Mapping[str, Scalar]) -> RunConfig:
        """Parse `context.run_config` (keys with dashes, e.g. `local-steps`)."""
        # Empty strings are the Flower App's "unset" defaults
        # (trainer/flower/flwr_app/pyproject.toml).
        values = {k.replace("-", "_"): v for k, v in config.items() if v != ""}
        own = {f.name for f in fields(cls)} - {"spec"}
        unknown = set(values) - own - set(RoundSpec.model_fields)
        if unknown:
            raise ConfigError(f"unknown run config keys: {sorted(unknown)}")
        if "home" not in values or "run_id" not in values or "algorithm" not in values:
            raise ConfigError("run config needs at least home, run-id and algorithm")
        spec = _spec({k: v for k, v in values.items() if k in RoundSpec.model_fields})
        home = Path(str(values["home"]))
        try:
            role = behaviour_of(spec.algorithm).base_role
        except MethodError as e:
            raise ConfigError(f"run config algorithm: {e}") from e
        paths = {
            "store": home / "store",
            "base_model": home / "models" / role.value,
            "runs_dir": home / "runs",
        }
        kwargs: dict[str, object] = {
            name: Path(str(values[name])) if name in values else default
            for name, default in paths.items()
        }
        if "node_bindings" in values:
            kwargs["node_bindings"] = Path(str(values["node_bindings"]))
        for name, parse in (
            ("max_rank", _integer),
            ("min_nodes", _integer),
            ("round_timeout", float),
            ("resume", _boolean),
        ):
            if name in values:
                try:
                    kwargs[name] = parse(values[name])
                except (TypeError, ValueError) as e:
                    key = name.replace("_", "-")
                    raise ConfigError(f"run config {key}={values[name]!r}: {e}") from e
        return cls(run_id=str(values["run_id"]), spec=spec, home=home, **kwargs)  # type: ignore[arg-type]

    def to_flower(self) -> dict[str, Scalar]:
        """The inverse of `from_flower`: flat, dash-separated, scalar values."""
        out: dict[str, Scalar] = {"run-id": self.run_id, **_flat_spec(self.spec)}
        for f in fields(self):
            if f.name in ("run_id", "spec"):
                continue
            value = getattr(self, f.name)
            if value is None:
                value = ""  # Flower's run config has no null: empty is "unset"
            out[f.name.replace("_", "-")] = str(value) if isinstance(value, Path) else value
        return out


def _flat_spec(spec: RoundSpec) -> dict[str, Scalar]:
    """A spec as run config keys (dashes; users comma-separated, empty for all)."""
    out: dict[str, Scalar] = {}
    for key, value in spec.model_dump().items():
        if key == "users":
            value = ",".join(value or ())
        out[key.replace("_", "-")] = value
    return out


def _spec(values: Mapping[str, Scalar]) -> RoundSpec:
    values = dict(values)
    if "users" in values:
        text = str(values["users"]).strip()
        values["users"] = tuple(u.strip() for u in text.split(",") if u.strip()) or None  # type: ignore[assignment]
    try:
        return RoundSpec.model_validate(values)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']).replace('_', '-')}: {err['msg']}"
            for err in e.errors()
        )
        raise ConfigError(f"run config: {problems}") from e


def _integer(raw: Scalar) -> int:
    if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
        raise ValueError("expected an integer")
    return int(raw)


def _boolean(raw: Scalar) -> bool:
    if isinstance(raw, str):
        return raw.lower() in ("1", "true", "yes")
    return bool(raw)


@dataclass(frozen=True)
class NodeIdentity:
    """Who a ClientApp trains for, from its SuperNode's node config.

    Deployment: `flower-supernode --node-config "user='alice' silo='/data/alice'"` (optionally
    `store=...` and `base-model=...` where the device sees them under other paths). Simulation:
    the node config only has `partition-id`, which picks `RunConfig.users[partition-id]`, and the
    silo defaults to `<home>/silos/<user>`.
    """

    user: str
    silo: Path
    store: Path
    base_model: Path

    @classmethod
    def from_flower(cls, node_config: Mapping[str, Scalar], run: RunConfig) -> NodeIdentity:
        user = node_config.get("user")
        if user in (None, ""):
            if "partition-id" not in node_config:
                raise ConfigError("node config names no user (set user=... or partition-id=...)")
            index = int(node_config["partition-id"])
            if not 0 <= index < len(run.users):
                raise ConfigError(
                    f"partition-id {index} has no user: the run names {len(run.users)} users"
                )
            user = run.users[index]
        try:
            user = validate_user_id(str(user))
        except InvalidName as e:
            raise ConfigError(f"node config user: {e}") from e
        silo = node_config.get("silo") or run.home / "silos" / user
        store = node_config.get("store") or run.store
        base_model = node_config.get("base-model") or run.base_model
        return cls(
            user=user,
            silo=Path(str(silo)),
            store=Path(str(store)),
            base_model=Path(str(base_model)),
        )


def spec_of(config: RunConfig) -> RoundSpec:
    """The `RoundSpec` a run config carries out (for records of runs started by `flwr run`)."""
    return config.spec


def config_of(
    spec: RoundSpec, *, run_id: str, home: Path, users: tuple[str, ...], **overrides: object
) -> RunConfig:
    """The run config that carries out `spec` for `users` under `home`.

    `overrides` set the run config's own keys (`store`, `base_model`, `runs_dir`, `max_rank`,
    `min_nodes`, `round_timeout`, `resume`); None keeps the default.
    """
    resolved = spec.model_copy(update={"users": tuple(users) or None})
    values: dict[str, Scalar] = {"run-id": run_id, "home": str(home), **_flat_spec(resolved)}
    for key, value in overrides.items():
        if value is not None:
            values[key.replace("_", "-")] = str(value) if isinstance(value, Path) else value  # type: ignore[assignment]
    return RunConfig.from_flower(values)
