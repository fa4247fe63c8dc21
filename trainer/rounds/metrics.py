"""Prometheus metrics of federated rounds, in a registry of their own.

Fed from finished round records (`runs.RoundRecord`), so the process that exports them (the
round controller in the gateway or in `fedpersona trainer`) need not be the one that trained.
Labels are the algorithm and the outcome only: a per-user label would make the series count grow
with the user base and publish who took part, so per-client numbers go into histograms.
"""

from __future__ import annotations

from fedpersona.trainer.rounds.records import RoundRecord
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_BYTES_BUCKETS = tuple(float(4**k) for k in range(5, 17))  # 1 KiB .. 4 GiB
_SECONDS_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


class TrainerMetrics:
    """The trainer's metrics; `registry` is what a `/metrics` endpoint exposes."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.rounds = Counter(
            "fedpersona_trainer_rounds",
            "Federated rounds completed.",
            ["algorithm"],
            registry=self.registry,
        )
        self.runs = Counter(
            "fedpersona_trainer_runs",
            "Training runs finished, by outcome.",
            ["algorithm", "state"],
            registry=self.registry,
        )
        self.bytes_up = Histogram(
            "fedpersona_trainer_client_uplink_bytes",
            "Serialized array bytes one client sent to the server in one round.",
            ["algorithm"],
            buckets=_BYTES_BUCKETS,
            registry=self.registry,
        )
        self.bytes_down = Histogram(
            "fedpersona_trainer_client_downlink_bytes",
            "Serialized array bytes the server sent to one client in one round.",
            ["algorithm"],
            buckets=_BYTES_BUCKETS,
            registry=self.registry,
        )
        self.round_seconds = Histogram(
            "fedpersona_trainer_round_seconds",
            "Wall time of one round, from sending the global to publishing.",
            ["algorithm"],
            buckets=_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.train_loss = Gauge(
            "fedpersona_trainer_train_loss",
            "Example-weighted mean training loss of the last round.",
            ["algorithm"],
            registry=self.registry,
        )
        self.active = Gauge(
            "fedpersona_trainer_run_active",
            "1 while a training run is in progress.",
            registry=self.registry,
        )

    def observe_round(self, algorithm: str, record: RoundRecord) -> None:
        self.rounds.labels(algorithm).inc()
        self.round_seconds.labels(algorithm).observe(record.wall_s)
        for client in record.clients:
            self.bytes_up.labels(algorithm).observe(client.bytes_up)
            self.bytes_down.labels(algorithm).observe(client.bytes_down)
        if record.train_loss is not None:
            self.train_loss.labels(algorithm).set(record.train_loss)

    def observe_run_end(self, algorithm: str, state: str) -> None:
        self.runs.labels(algorithm, state).inc()
