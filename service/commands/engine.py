"""`fedpersona engine`: print, or exec, the exact vLLM command the gateway's supervisor runs.

The vLLM container of the Helm chart runs `fedpersona engine --exec`, so a separately deployed
engine is started by the same `build_launch` as the embedded one. It reads only what the
engine needs (`FEDPERSONA_HOME`, `FEDPERSONA_STORE_DIR`, `FEDPERSONA_ENGINE__...`), not the
gateway's settings, so the engine container needs no gateway secrets.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from fedpersona.adapters.home import DEFAULT_HOME, HOME_ENV
from fedpersona.service.engine.config import EngineLaunch, EngineSettings, build_launch
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class EngineProcessSettings(BaseSettings):
    """The subset of the gateway's settings the engine process reads (same env names)."""

    model_config = SettingsConfigDict(
        env_prefix="FEDPERSONA_", env_nested_delimiter="__", extra="ignore", populate_by_name=True
    )

    home: Path = Field(default=DEFAULT_HOME, validation_alias=HOME_ENV)
    store_dir: Path | None = None
    engine: EngineSettings = Field(default_factory=EngineSettings)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--home", type=Path, help="fedpersona home (env FEDPERSONA_HOME)")
    parser.add_argument("--model-dir", type=Path, help="large base model dir")
    parser.add_argument("--host", help="address vLLM listens on (0.0.0.0 in a container)")
    parser.add_argument("--port", type=int, help="port vLLM listens on")
    parser.add_argument("--json", action="store_true", help="print argv and env as JSON")
    parser.add_argument(
        "--exec", action="store_true", help="replace this process with vLLM instead of printing"
    )


def launch_from_args(args: argparse.Namespace) -> EngineLaunch:
    settings = EngineProcessSettings()
    if args.home is not None:
        settings.home = args.home
    updates = {
        key: value
        for key, value in (
            ("model_dir", args.model_dir),
            ("host", args.host),
            ("port", args.port),
        )
        if value is not None
    }
    # Validate the overrides like the environment would be validated.
    engine = EngineSettings.model_validate({**settings.engine.model_dump(), **updates})
    return build_launch(engine, home=settings.home, store_dir=settings.store_dir)


def run(args: argparse.Namespace) -> int:
    launch = launch_from_args(args)
    if args.exec:
        if EngineProcessSettings().engine.api_key is None:
            # A key generated here would be known to no gateway: refuse an open engine instead.
            print(
                "fedpersona engine --exec: set FEDPERSONA_ENGINE__API_KEY (the same secret the "
                "gateway sends) before starting a separately run engine",
                file=sys.stderr,
            )
            return 2
        sys.stdout.flush()
        os.execvpe(launch.argv[0], launch.argv, launch.environ(os.environ))
    if args.json:
        print(json.dumps({"argv": launch.argv, "env": launch.public_env()}, indent=2))
    else:
        print(launch.shell())
    return 0
