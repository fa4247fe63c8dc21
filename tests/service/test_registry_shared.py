"""State shared by several gateways: rate limits in the database, and two gateway apps on one
PostgreSQL server seeing each other's users, deletions, tombstones and rate limits."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_engine import FakeEngine
from fastapi.testclient import TestClient
from fedpersona.adapters import AdapterStore, Slot
from fedpersona.service.db import Database, PostgresDatabase, SqliteDatabase, open_database
from fedpersona.service.db_migrations import migrate
from fedpersona.service.db_ratelimit import DatabaseRateLimiter, rate_limiter_for
from fedpersona.service.http.app import create_app
from fedpersona.service.ratelimit import RateLimiter
from fedpersona.service.settings import Settings
from gateway_harness import ADMIN_KEY, make_settings, tiny_lora
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pydantic import ValidationError

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    location: Path | str = tmp_path / "registry.sqlite"
    if request.param == "postgresql":
        location = request.getfixturevalue("postgres_url")
    db = open_database(location)
    assert isinstance(db, SqliteDatabase | PostgresDatabase)
    migrate(db)
    yield db
    db.close()


# ---- the token bucket in the database -------------------------------------------------------


def test_database_bucket_refills_at_rate(database: Database) -> None:
    # The same expectations as the in-memory bucket's test (test_gateway_errors).
    now = [1000.0]
    limiter = DatabaseRateLimiter(database, rate_per_s=2.0, burst=3, clock=lambda: now[0])
    assert [limiter.acquire("u") for _ in range(3)] == [None, None, None]
    assert limiter.acquire("u") == pytest.approx(0.5)
    now[0] = 1000.25
    assert limiter.acquire("u") == pytest.approx(0.25)
    now[0] = 1000.5
    assert limiter.acquire("u") is None
    now[0] = 2000.0  # refill caps at the burst
    assert [limiter.acquire("u") for _ in range(4)][-1] == pytest.approx(0.5)
    assert limiter.acquire("other") is None
    now[0] = 1500.0  # a gateway with a clock behind: time never runs backwards for a bucket
    assert limiter.acquire("u") == pytest.approx(0.5)
    limiter.forget("u")
    assert limiter.acquire("u") is None


def test_database_clock_and_retry_after(database: Database) -> None:
    limiter = DatabaseRateLimiter(database, rate_per_s=0.1, burst=2)  # one token every 10 s
    assert limiter.acquire("alice") is None and limiter.acquire("alice") is None
    wait = limiter.acquire("alice")
    assert wait is not None and 5.0 < wait <= 10.0


def test_one_bucket_across_gateways_under_concurrency(database: Database) -> None:
    # Four "gateways" (own connections) firing 15 requests each at one user's bucket of 10:
    # exactly 10 pass, whatever the interleaving.
    location = database.path if isinstance(database, SqliteDatabase) else database.url
    others = [open_database(location) for _ in range(3)]
    limiters = [
        DatabaseRateLimiter(db, rate_per_s=1 / 3600, burst=10) for db in [database, *others]
    ]
    granted: list[bool] = []
    barrier = threading.Barrier(len(limiters))

    def fire(limiter: RateLimiter) -> None:
        barrier.wait()
        for _ in range(15):
            granted.append(limiter.acquire("alice") is None)

    threads = [threading.Thread(target=fire, args=(lim,)) for lim in limiters]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(granted) == 60 and sum(granted) == 10
    for db in others:
        db.close()


def test_rate_limit_scope(database: Database, tmp_path: Path) -> None:
    auto = rate_limiter_for(make_settings(tmp_path, rate_limit_rpm=60), database)
    on_postgres = database.dialect == "postgresql"
    assert isinstance(auto, DatabaseRateLimiter) == on_postgres and auto is not None
    assert auto.rate_per_s == 1.0 and auto.burst == 20
    shared = make_settings(tmp_path, rate_limit_rpm=60, rate_limit_scope="database")
    assert isinstance(rate_limiter_for(shared, database), DatabaseRateLimiter)
    local = make_settings(tmp_path, rate_limit_rpm=60, rate_limit_scope="process")
    assert type(rate_limiter_for(local, database)) is RateLimiter
    assert rate_limiter_for(make_settings(tmp_path, rate_limit_rpm=0), database) is None


def test_settings_database_url(tmp_path: Path) -> None:
    assert make_settings(tmp_path).registry_location == tmp_path / "registry.sqlite"
    url = "postgresql://fp:s3cret@db:5432/fedpersona"
    settings = make_settings(tmp_path, database_url=url)
    assert settings.registry_location == url and "s3cret" not in repr(settings)
    assert make_settings(tmp_path, database_url="").registry_location == settings.registry_file
    with pytest.raises(ValidationError, match="postgresql://"):
        make_settings(tmp_path, database_url="mysql://db/fp")


# ---- two gateways on one PostgreSQL ---------------------------------------------------------


def _gateway(home: Path, store: Path, url: str, **overrides: Any) -> TestClient:
    settings: Settings = make_settings(home, store_dir=store, database_url=url, **overrides)
    client = TestClient(create_app(settings, engine=FakeEngine()))
    client.__enter__()
    return client


def _chat(client: TestClient, key: str) -> int:
    body = {"model": "personal", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {key}"}
    return client.post("/v1/chat/completions", json=body, headers=headers).status_code


def test_two_gateways_share_users_deletions_and_rate_limits(
    postgres_url: str, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    shared_store = AdapterStore(store, max_rank=16)
    for i, user in enumerate(["alice", "bob"]):
        shared_store.publish_lora(Slot.user_served(user), tiny_lora(seed=i))
    limits = {"rate_limit_rpm": 6, "rate_limit_burst": 2}  # one token every 10 s
    a = _gateway(tmp_path / "a", store, postgres_url, **limits)
    b = _gateway(tmp_path / "b", store, postgres_url, **limits)
    try:
        # A user created on A is served by B, and the other way round.
        alice = a.post("/admin/users", json={"name": "alice"}, headers=ADMIN).json()["key"]
        bob = b.post("/admin/users", json={"name": "bob"}, headers=ADMIN).json()["key"]
        assert {u["name"] for u in b.get("/admin/users", headers=ADMIN).json()} == {
            "alice",
            "bob",
        }
        assert _chat(b, alice["api_key"]) == 200
        assert _chat(a, bob["api_key"]) == 200
        # One bucket per user across both gateways: alice's burst of 2 is spent (1 on B now).
        assert _chat(a, alice["api_key"]) == 200
        assert _chat(a, alice["api_key"]) == 429
        assert _chat(b, alice["api_key"]) == 429
        assert _chat(b, bob["api_key"]) == 200  # bob's own bucket

        # Deleted on B: A refuses her key at once, and her name stays taken on both.
        assert b.delete("/admin/users/alice", headers=ADMIN).status_code == 200
        assert _chat(a, alice["api_key"]) == 401
        refused = a.post("/admin/users", json={"name": "alice"}, headers=ADMIN)
        assert refused.status_code == 409
        assert refused.json()["error"]["code"] == "user_name_deleted"

        # Reused on purpose on A: a new identity; the old key stays dead on both gateways.
        again = a.post(
            "/admin/users?reuse_deleted_name=true", json={"name": "alice"}, headers=ADMIN
        )
        assert again.status_code == 201
        new_key = again.json()["key"]["api_key"]
        for gateway in (a, b):
            assert _chat(gateway, alice["api_key"]) == 401
            models = gateway.get("/v1/models", headers={"Authorization": f"Bearer {new_key}"})
            assert models.status_code == 200
        registry = a.app.state.services.registry  # type: ignore[attr-defined]
        (tombstone,) = registry.deleted("alice")
        assert tombstone.user_id != registry.get_user("alice").user_id
        assert tombstone.reused_at is not None
        # Nothing of the old alice is served to the new one: her slot was quarantined.
        assert AdapterStore(store, max_rank=16).current(Slot.user_served("alice")) is None
    finally:
        for client in (a, b):
            client.__exit__(None, None, None)
            client.app.state.services.registry.close()  # type: ignore[attr-defined]


def test_users_cli_manages_the_shared_database(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    from fedpersona.service.commands.users import main as users_main
    from fedpersona.service.registry import Registry

    monkeypatch.setenv("FEDPERSONA_DATABASE_URL", postgres_url)
    assert users_main(["--home", str(tmp_path), "add", "erin"]) == 0
    key = capsys.readouterr().out.strip()
    registry = Registry(postgres_url)
    user = registry.authenticate(key)
    assert user is not None and user.name == "erin"
    assert not (tmp_path / "registry.sqlite").exists()  # nothing went to a local file
    assert users_main(["--home", str(tmp_path), "delete", "erin"]) == 0
    assert registry.authenticate(key) is None and registry.is_deleted_name("erin")
    registry.close()


def test_a_lost_database_is_a_503_not_a_crash(postgres_url: str, tmp_path: Path) -> None:
    import psycopg
    from fedpersona.service.db import PostgresDatabase
    from fedpersona.service.registry import Registry

    registry = Registry(PostgresDatabase(postgres_url, pool_size=2, connect_timeout_s=1.0))
    registry.create_user("alice")
    key = registry.issue_key("alice").api_key
    settings = make_settings(tmp_path, rate_limit_rpm=60, database_url=postgres_url)
    client = TestClient(create_app(settings, engine=FakeEngine(), registry=registry))
    with client:
        auth = {"Authorization": f"Bearer {key}"}
        assert client.get("/v1/models", headers=auth).status_code == 200
        # The database goes away under the gateway (connections cut, reconnects refused).
        name = postgres_url.rsplit("/", 1)[1]
        admin_url = postgres_url.rsplit("/", 1)[0] + "/postgres"
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        for _ in range(2):  # also once the pool found every connection dead
            lost = client.get("/v1/models", headers=auth)
            assert lost.status_code == 503 and lost.headers["retry-after"] == "5"
            error = lost.json()["error"]
            assert error["code"] == "registry_unavailable" and "127.0.0.1" not in error["message"]
        ready = client.get("/ready")
        assert ready.status_code == 503 and ready.json()["checks"]["registry"] is False
        assert client.get("/health").status_code == 200  # the process itself is fine
    registry.close()


@hypothesis_settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    steps=st.lists(
        # Steps on a microsecond grid, like the database's own clock (extract(epoch ...)): a
        # subnormal step would make PostgreSQL's float8 product raise "underflow", a case no
        # real clock produces.
        st.tuples(
            st.floats(0.0, 3.0).map(lambda dt: round(dt, 6)), st.sampled_from(["alice", "bob"])
        ),
        min_size=1,
        max_size=12,
    ),
    rate=st.sampled_from([0.5, 2.0, 7.0]),
    burst=st.integers(1, 4),
)
def test_database_bucket_answers_like_the_memory_bucket(
    database: Database, steps: list[tuple[float, str]], rate: float, burst: int
) -> None:
    now = [0.0]
    memory = RateLimiter(rate_per_s=rate, burst=burst, clock=lambda: now[0])
    shared = DatabaseRateLimiter(database, rate_per_s=rate, burst=burst, clock=lambda: now[0])
    for user in ("alice", "bob"):
        shared.forget(user)
    for dt, user in steps:
        now[0] += dt
        expected, got = memory.acquire(user), shared.acquire(user)
        assert (got is None) == (expected is None)
        if expected is not None and got is not None:
            assert got == pytest.approx(expected, rel=1e-6, abs=1e-6)
