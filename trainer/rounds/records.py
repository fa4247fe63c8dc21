"""Run records: what a training run asked for, how far it got and what each round measured.

A run record is one JSON file, `<home>/runs/<run id>.json`, rewritten atomically (temporary file,
fsync, rename) every time the run advances, so a reader (the round controller, the gateway, a
person with `cat`) always sees a whole record. The process that runs the rounds writes it; the
controller only reads it, plus marks a run failed when that process died without saying so.

This module knows the record's shape and its file; it knows nothing about Flower or training.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Literal

from fedpersona.adapters import InvalidName, validate_user_id
from fedpersona.trainer.errors import RunNotFound
from fedpersona.trainer.methods import method_names
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

_RUN_ID = re.compile(r"^r-[0-9]{8}t[0-9]{6}-[0-9a-f]{6}$")


class RunState(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"


class RoundSpec(BaseModel):
    """What a run should do. `users=None` means every user that has a silo under the home.

    The one definition of a run's training settings: the HTTP API takes it as JSON, the CLI's
    flags are generated from its fields (`fedpersona.trainer.commands.spec_args`), and the Flower
    run config carries it (`fedpersona.trainer.flower.runconfig.RunConfig.spec`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    algorithm: str = Field(
        default="pftt",
        description="the federated method (fedpersona.trainer.methods)",
        json_schema_extra={"enum": list(method_names())},
    )
    rounds: int = Field(default=1, ge=1, le=1000, description="federated rounds")
    users: tuple[str, ...] | None = Field(
        default=None, description="user ids to train (default: every user with a silo)"
    )
    local_steps: int = Field(
        default=8, ge=1, le=100_000, description="local training steps per client and round"
    )
    lr: float = Field(default=2e-3, gt=0, le=1.0, description="local learning rate (Adam)")
    rank: int = Field(default=8, ge=1, le=64, description="LoRA rank budget (alpha = 2 x rank)")
    batch_size: int = Field(default=4, ge=1, le=1024, description="chats per training batch")
    max_len: int = Field(default=128, ge=8, le=8192, description="tokens per chat (truncated)")
    seed: int = Field(default=0, ge=0, description="seed of initialization and batch order")
    prox_mu: float = Field(
        default=0.0,
        ge=0.0,
        le=100.0,
        description="FedProx coefficient mu on the shared LoRA (0: the method's own, "
        "fedprox: 0.01)",
    )
    max_examples: int = Field(
        default=100_000,
        ge=1,
        description="cap on the example count one client's reply may weigh with",
    )
    aggregation: Literal["mean", "median", "trimmed-mean", "krum", "multi-krum"] = Field(
        default="mean",
        description="how the shared part is aggregated (fedpersona.trainer.methods.robust)",
    )
    trim_fraction: float = Field(
        default=0.1,
        ge=0.0,
        lt=0.5,
        description="trimmed-mean: fraction of clients cut at each end, per coordinate",
    )
    byzantine: int = Field(
        default=1, ge=0, le=1000, description="krum, multi-krum: clients assumed malicious"
    )
    clip_norm: float = Field(
        default=0.0,
        ge=0.0,
        description="clip each client's update (upload - global) to this L2 norm (0: off)",
    )
    dp_noise: float = Field(
        default=0.0,
        ge=0.0,
        le=100.0,
        description="central DP: Gaussian noise multiplier on the clipped mean (needs clip-norm)",
    )
    dp_delta: float = Field(default=1e-5, gt=0.0, lt=1.0, description="central DP: delta")
    secure_aggregation: bool = Field(
        default=False,
        description="mask each client's shared update so the server sees only the weighted sum "
        "(fedpersona.trainer.flower.secagg)",
    )
    secagg_range: float = Field(
        default=1.0,
        gt=0.0,
        le=1e6,
        description="secure aggregation: clipping range of each coordinate of an update "
        "(upload - global); the mean's quantization error is at most 2 x range / 2**24",
    )

    @field_validator("algorithm")
    @classmethod
    def _check_algorithm(cls, algorithm: str) -> str:
        if algorithm not in method_names():
            raise ValueError(
                f"unknown algorithm {algorithm!r}; expected one of {', '.join(method_names())}"
            )
        return algorithm

    @model_validator(mode="after")
    def _check_privacy(self) -> RoundSpec:
        if self.dp_noise > 0 and self.clip_norm <= 0:
            raise ValueError("dp-noise needs clip-norm > 0 (the noise is scaled to it)")
        if self.dp_noise > 0 and self.aggregation != "mean":
            raise ValueError("dp-noise is calibrated for aggregation 'mean' only")
        if self.secure_aggregation:
            _check_secure_aggregation(self)
        return self

    @field_validator("users")
    @classmethod
    def _check_users(cls, users: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if users is None:
            return None
        if not users:
            raise ValueError("users must name at least one user (or be null for all)")
        if len(set(users)) != len(users):
            raise ValueError("users must not repeat")
        for user in users:
            try:
                validate_user_id(user)
            except InvalidName as e:
                raise ValueError(str(e)) from e
        return users


# Methods whose shared part is the example-weighted mean of a dense LoRA upload: what secure
# aggregation can compute from the masked sum alone.
SECURE_AGGREGATION_METHODS = ("fedavg", "fedprox", "fedavg-ft", "pftt", "fedsa", "fedpt")


def _check_secure_aggregation(spec: RoundSpec) -> None:
    """Secure aggregation hides each update from the server: refuse what needs them."""
    if spec.algorithm not in SECURE_AGGREGATION_METHODS:
        raise ValueError(
            f"secure-aggregation: {spec.algorithm!r} does not aggregate a weighted mean of dense "
            f"uploads; supported: {', '.join(SECURE_AGGREGATION_METHODS)}"
        )
    if spec.aggregation != "mean":
        raise ValueError(
            f"secure-aggregation: the server sees only the sum, so aggregation "
            f"{spec.aggregation!r} (which needs each client's update) cannot run; use 'mean'"
        )
    if spec.clip_norm > 0 or spec.dp_noise > 0:
        raise ValueError(
            "secure-aggregation: clip-norm and dp-noise clip each client's update on the "
            "server, which never sees it; turn them off"
        )


class ClientRound(BaseModel):
    """One client's share of one round. Bytes are the serialized array payloads of its messages."""

    user: str
    num_examples: int
    bytes_up: int
    bytes_down: int
    train_loss: float | None = None
    metrics: dict[str, float] = Field(
        default_factory=dict, description="what the client reported (e.g. reward-mix for pfit)"
    )


class RoundRecord(BaseModel):
    round: int
    wall_s: float
    train_loss: float | None
    bytes_up: int
    bytes_down: int
    clients: list[ClientRound]
    global_version: str | None = None
    served_versions: dict[str, str] = Field(default_factory=dict)
    refused: list[str] = Field(
        default_factory=list, description="replies the server dropped, with the reason"
    )
    epsilon: float | None = Field(
        default=None, description="central DP: the run's epsilon after this round (at dp_delta)"
    )
    secure_aggregation: dict[str, float] | None = Field(
        default=None,
        description="secure aggregation: the extra stages' wall time (wall-s) and bytes "
        "(bytes-up, bytes-down, all clients; also counted in the clients' bytes)",
    )


class RunStatus(BaseModel):
    """A run as the controller and the gateway report it (`GET /admin/rounds/{id}`)."""

    id: str
    state: RunState
    spec: RoundSpec
    users: list[str] = Field(default_factory=list)
    progress: float = 0.0
    rounds: list[RoundRecord] = Field(default_factory=list)
    error: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    pid: int | None = None

    @property
    def done(self) -> bool:
        return self.state in (RunState.succeeded, RunState.failed)


def new_run_id(now: datetime | None = None) -> str:
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dt%H%M%S")
    return f"r-{stamp}-{secrets.token_hex(3)}"


def check_run_id(run_id: str) -> str:
    """`run_id` if it has the shape `new_run_id` makes (it names a file); else RunNotFound."""
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        raise RunNotFound(f"no run {run_id!r} (run ids look like r-20260101t120000-abcdef)")
    return run_id


def utcnow() -> datetime:
    return datetime.now(UTC)


class RunRecords:
    """The run records below one directory (created on first write)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, run_id: str) -> Path:
        return self.root / f"{check_run_id(run_id)}.json"

    def write(self, status: RunStatus) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        target = self.path(status.id)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        data = status.model_dump_json(indent=2).encode()
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        dir_fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def read(self, run_id: str) -> RunStatus:
        path = self.path(run_id)
        try:
            return RunStatus.model_validate_json(path.read_bytes())
        except FileNotFoundError as e:
            raise RunNotFound(f"no run {run_id!r}") from e
        except (ValidationError, ValueError) as e:
            raise RunNotFound(f"run record {path} is unreadable: {e}") from e

    def list_all(self) -> list[RunStatus]:
        """Every readable run record, oldest first."""
        found = []
        if self.root.is_dir():
            for path in self.root.glob("r-*.json"):
                try:
                    found.append(self.read(path.stem))
                except RunNotFound:
                    continue
        return sorted(found, key=lambda s: (s.created_at, s.id))

    def create(self, spec: RoundSpec, *, users: list[str], run_id: str | None = None) -> RunStatus:
        """Write a new queued record for `spec` (a fresh id unless `run_id` is given)."""
        status = RunStatus(
            id=check_run_id(run_id) if run_id else new_run_id(),
            state=RunState.queued,
            spec=spec,
            users=users,
            created_at=utcnow(),
        )
        self.write(status)
        return status

    def update(self, run_id: str, **changes: object) -> RunStatus:
        """Read, change fields, write back (only the run's own process writes, so no race)."""
        status = self.read(run_id).model_copy(update=changes)
        self.write(status)
        return status


def summary_line(status: RunStatus) -> str:
    """A one-line human summary (for logs and the CLI)."""
    last = status.rounds[-1] if status.rounds else None
    loss = f" loss {last.train_loss:.4f}" if last and last.train_loss is not None else ""
    return (
        f"{status.id} {status.spec.algorithm} {status.state.value} "
        f"{len(status.rounds)}/{status.spec.rounds} rounds{loss}"
        + (f" error: {status.error}" if status.error else "")
    )


def dumps(status: RunStatus) -> str:
    return json.dumps(json.loads(status.model_dump_json()), indent=2)
