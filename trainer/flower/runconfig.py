"""The Flower run config and node config of a fedpersona run, parsed once into dataclasses.

Flower hands a ServerApp/ClientApp flat `{str: scalar}` mappings (`context.run_config`,
`context.node_config`). Everything the apps need is read here, with defaults resolved against
the home directory, so no code deeper down looks up `run_config["..."]` by itself. The same keys
are the `[tool.flwr.app.config]` of the Deployment Engine app
(`trainer/flower/flwr_app/pyproject.toml`)
and what `RunConfig.to_flower` writes for `flwr run --run-config`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from fedpersona.adapters import InvalidName, validate_user_id
from fedpersona.trainer.errors import ConfigError
from fedpersona.trainer.rounds.records import ALGORITHMS, RoundSpec, check_run_id

Scalar = bool | int | float | str | bytes


@dataclass(frozen=True)
class RunConfig:
    """Settings of one run, identical on the server and on every client."""

    run_id: str
    algorithm: str
    home: Path
    store: Path
    base_model: Path
    runs_dir: Path
    rounds: int = 1
    users: tuple[str, ...] = ()
    local_steps: int = 8
    lr: float = 2e-3
    batch_size: int = 4
    max_len: int = 128
    rank: int = 8
    seed: int = 0
    prox_mu: float = 0.0
    max_rank: int = 16
    min_nodes: int = 0
    round_timeout: float = 3600.0
    resume: bool = True

    def __post_init__(self) -> None:
        check_run_id(self.run_id)
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        for name in ("rounds", "local_steps", "batch_size", "max_len", "rank", "max_rank"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        for user in self.users:
            try:
                validate_user_id(user)
            except InvalidName as e:
                raise ConfigError(f"users: {e}") from e

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
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown run config keys: {sorted(unknown)}")
        if "home" not in values or "run_id" not in values or "algorithm" not in values:
            raise ConfigError("run config needs at least home, run-id and algorithm")
        home = Path(str(values["home"]))
        kwargs: dict[str, object] = {}
        for f in fields(cls):
            if f.name not in values:
                continue
            raw = values[f.name]
            try:
                kwargs[f.name] = _convert(f.name, raw)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"run config {f.name.replace('_', '-')}={raw!r}: {e}") from e
        kwargs["home"] = home
        for name, default in (
            ("store", home / "store"),
            # FedPT tunes the small model (its experts steer the large one at serving time).
            (
                "base_model",
                home / "models" / ("small" if values["algorithm"] == "fedpt" else "large"),
            ),
            ("runs_dir", home / "runs"),
        ):
            value = kwargs.get(name)
            kwargs[name] = Path(str(value)) if value not in (None, "") else default
        return cls(**kwargs)  # type: ignore[arg-type]

    def to_flower(self) -> dict[str, Scalar]:
        """The inverse of `from_flower`: flat, dash-separated, scalar values."""
        out: dict[str, Scalar] = {}
        for key, value in asdict(self).items():
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = ",".join(value)
            out[key.replace("_", "-")] = value
        return out


_INT = {"rounds", "local_steps", "batch_size", "max_len", "rank", "seed", "max_rank", "min_nodes"}
_FLOAT = {"lr", "prox_mu", "round_timeout"}


def _convert(name: str, raw: Scalar) -> object:
    if name in _INT:
        if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
            raise ValueError("expected an integer")
        return int(raw)  # type: ignore[arg-type]
    if name in _FLOAT:
        return float(raw)  # type: ignore[arg-type]
    if name == "resume":
        if isinstance(raw, str):
            return raw.lower() in ("1", "true", "yes")
        return bool(raw)
    if name == "users":
        text = str(raw).strip()
        return tuple(u.strip() for u in text.split(",") if u.strip()) if text else ()
    return str(raw)


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
            index = int(node_config["partition-id"])  # type: ignore[arg-type]
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
    return RoundSpec(
        algorithm=config.algorithm,  # type: ignore[arg-type]
        rounds=config.rounds,
        users=config.users or None,
        local_steps=config.local_steps,
        lr=config.lr,
        rank=config.rank,
        batch_size=config.batch_size,
        max_len=config.max_len,
        seed=config.seed,
    )


def config_of(
    spec: RoundSpec, *, run_id: str, home: Path, users: tuple[str, ...], **overrides: object
) -> RunConfig:
    """The run config that carries out `spec` for `users` under `home`."""
    values: dict[str, Scalar] = {
        "run-id": run_id,
        "home": str(home),
        "algorithm": spec.algorithm,
        "rounds": spec.rounds,
        "users": ",".join(users),
        "local-steps": spec.local_steps,
        "lr": spec.lr,
        "rank": spec.rank,
        "batch-size": spec.batch_size,
        "max-len": spec.max_len,
        "seed": spec.seed,
    }
    for key, value in overrides.items():
        if value is not None:
            values[key.replace("_", "-")] = str(value) if isinstance(value, Path) else value  # type: ignore[assignment]
    return RunConfig.from_flower(values)
