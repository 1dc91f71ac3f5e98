"""Settings resolution: command-line flag > SPLITFUSE_* environment > --config file > defaults.

The defaults live in config/default.toml (sections [engine] and [server]); every key there can be
overridden by name. Unknown keys in a config file are an error, so a typo never goes unnoticed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from app.engine.config import EngineConfig

ENV_PREFIX = "SPLITFUSE_"
LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass
class ServerConfig:
    """How the HTTP server runs; every default is documented in config/default.toml."""

    host: str = "0.0.0.0"
    port: int = 23333
    api_keys: list[str] = field(default_factory=list)
    max_body_bytes: int = 4 * 2**20
    max_header_bytes: int = 32768
    max_headers: int = 128
    max_queued_requests: int = 1024
    max_tokens_cap: int = 0
    shutdown_timeout: float = 30.0
    health_stall_seconds: float = 30.0
    allow_request_chat_template: bool = False
    chat_template_timeout: float = 2.0
    chat_template_max_chars: int = 1_000_000
    log_format: str = "auto"
    log_level: str = "info"
    proxy_url: str = ""
    node_url: str = ""
    tool_call_parser: str = ""
    reasoning_parser: str = ""
    grammar_compile_timeout: float = 10.0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            # uvicorn would bind the port modulo 65536; 0 is any free port (uvicorn logs which).
            raise ValueError(f"setting port: {self.port} is not a port number (0 to 65535)")
        for name, low in (
            ("max_body_bytes", 1),
            ("max_header_bytes", 1),
            ("max_headers", 1),
            ("max_queued_requests", 1),
            ("max_tokens_cap", 0),  # 0: up to the context window
            ("chat_template_max_chars", 1),
        ):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if not 0 <= self.shutdown_timeout < math.inf:  # 0: no draining
            raise ValueError(
                f"shutdown_timeout must be a finite number of seconds >= 0, "
                f"got {self.shutdown_timeout}"
            )
        for name in ("health_stall_seconds", "chat_template_timeout", "grammar_compile_timeout"):
            value = getattr(self, name)
            if not 0 < value < math.inf:
                raise ValueError(f"{name} must be a finite number of seconds > 0, got {value}")
        self.log_level = self.log_level.lower()
        if self.log_format not in LOG_FORMATS:
            raise ValueError(
                f"log_format must be one of {', '.join(LOG_FORMATS)}, got {self.log_format!r}"
            )
        if self.log_level not in LOG_LEVELS:
            raise ValueError(
                f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}"
            )


@dataclass
class Settings:
    model: str | None
    engine: EngineConfig
    server: ServerConfig


def default_config_path() -> Path:
    packaged = Path(__file__).resolve().parent / "default.toml"
    if packaged.exists():
        return packaged
    return Path(__file__).resolve().parent.parent / "config" / "default.toml"


def _read_toml(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config file {path} is not valid TOML: {exc}") from None
    unknown = set(data) - {"engine", "server"}
    if unknown:
        raise ValueError(f"config file {path}: unknown section(s) {', '.join(sorted(unknown))}")
    return data


def _coerce(name: str, kind: Any, value: Any) -> Any:
    """Turn a TOML or environment value into the field's type, or raise a one-line ValueError."""
    args = [a for a in get_args(kind) if a is not type(None)]
    optional = type(None) in get_args(kind)
    base = args[0] if optional and len(args) == 1 else kind
    try:
        if get_origin(base) is list:
            return (
                [v.strip() for v in value.split(",") if v.strip()]
                if isinstance(value, str)
                else [str(v) for v in value]
            )
        if base is bool:
            lowered = str(value).lower()
            if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError
            return lowered in ("1", "true", "yes", "on")
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            number = int(value)
            return None if number == 0 and optional else number
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base is str or get_origin(base) is Literal:
            text = str(value)
            return None if text == "" and optional else text
    except (TypeError, ValueError):
        raise ValueError(f"setting {name}: {value!r} is not a valid value") from None
    return value


def _apply(target: Any, values: Mapping[str, Any], origin: str) -> Any:
    hints = get_type_hints(type(target))
    names = {f.name for f in fields(target)}
    changes = {}
    for key, value in values.items():
        if key not in names:
            raise ValueError(f"{origin}: unknown setting {key!r}")
        changes[key] = _coerce(key, hints[key], value)
    return dataclasses.replace(target, **changes)


def load_settings(
    overrides: Mapping[str, Any] | None = None,
    config_file: str | None = None,
    model: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Resolve every setting; `overrides` are the flags the user actually gave."""
    env = os.environ if env is None else env
    engine, server = EngineConfig(), ServerConfig()
    layers: list[tuple[str, dict[str, dict[str, Any]]]] = [
        ("config/default.toml", _read_toml(default_config_path()))
    ]
    if config_file:
        layers.append((config_file, _read_toml(Path(config_file))))
    for origin, data in layers:
        engine = _apply(engine, data.get("engine", {}), origin)
        server = _apply(server, data.get("server", {}), origin)
    from_env: dict[str, dict[str, Any]] = {"engine": {}, "server": {}}
    for section, target in (("engine", engine), ("server", server)):
        for f in fields(target):
            key = ENV_PREFIX + f.name.upper()
            if key in env:
                from_env[section][f.name] = env[key]
    engine = _apply(engine, from_env["engine"], "environment")
    server = _apply(server, from_env["server"], "environment")
    overrides = dict(overrides or {})
    engine_names = {f.name for f in fields(EngineConfig)}
    engine = _apply(engine, {k: v for k, v in overrides.items() if k in engine_names}, "flags")
    server = _apply(server, {k: v for k, v in overrides.items() if k not in engine_names}, "flags")
    model = model or env.get(ENV_PREFIX + "MODEL") or None
    return Settings(model=model, engine=engine, server=server)
