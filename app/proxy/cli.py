"""`splitfuse proxy`: its command-line flags and the uvicorn start-up."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import structlog
import uvicorn

from app.argtypes import port, positive_float, positive_int
from app.proxy.app import ProxyConfig, create_app
from app.proxy.strategies import Strategy

ADMIN_KEY_ENV = "SPLITFUSE_ADMIN_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the proxy's flags to `parser` (the `splitfuse proxy` sub-command)."""
    defaults = ProxyConfig()
    parser.add_argument("--host", "--server-name", default="127.0.0.1", help="address to listen on")
    parser.add_argument(
        "--port", "--server-port", type=port, default=8000, help="port to listen on"
    )
    parser.add_argument(
        "--strategy",
        choices=[s.value for s in Strategy],
        default=defaults.strategy.value,
        help="how a node is chosen for each request",
    )
    parser.add_argument(
        "--admin-key",
        help=f"Bearer token for /nodes/*; default ${ADMIN_KEY_ENV}; "
        "with none, only loopback clients (with an API key when there are some) manage nodes",
    )
    parser.add_argument(
        "--api-keys", nargs="*", default=[], help="Bearer tokens accepted on the /v1 routes"
    )
    parser.add_argument(
        "--node-api-key", help="Bearer token the proxy sends to nodes (never the client's)"
    )
    parser.add_argument(
        "--health-interval",
        type=positive_float,
        default=defaults.health_interval,
        help="seconds between health checks of each node",
    )
    parser.add_argument(
        "--max-failures",
        type=positive_int,
        default=defaults.max_failures,
        help="failed checks or requests in a row that eject a node",
    )
    parser.add_argument(
        "--node-expiry",
        type=positive_float,
        default=defaults.node_expiry,
        help="seconds an ejected node is kept (and re-checked) before it is removed",
    )
    parser.add_argument(
        "--request-timeout",
        type=positive_float,
        default=defaults.request_timeout,
        help="seconds a node may take to start answering (a whole non-streamed answer)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=positive_float,
        default=defaults.connect_timeout,
        help="seconds to connect to a node before trying another",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=positive_int,
        default=defaults.max_body_bytes,
        help="largest request body accepted",
    )
    parser.add_argument(
        "--log-level", default="info", type=str.lower, choices=["debug", "info", "warning"]
    )


def config_from_args(args: argparse.Namespace) -> ProxyConfig:
    """The ProxyConfig that parsed flags (and $SPLITFUSE_ADMIN_KEY) describe."""
    return ProxyConfig(
        strategy=Strategy(args.strategy),
        api_keys=tuple(args.api_keys),
        admin_key=args.admin_key or os.environ.get(ADMIN_KEY_ENV) or None,
        node_api_key=args.node_api_key,
        health_interval=args.health_interval,
        max_failures=args.max_failures,
        node_expiry=args.node_expiry,
        request_timeout=args.request_timeout,
        connect_timeout=args.connect_timeout,
        max_body_bytes=args.max_body_bytes,
    )


def configure_logging(level: str) -> None:
    """structlog lines, readable on a terminal and JSON otherwise; uvicorn's own lines too."""
    renderer = (
        structlog.dev.ConsoleRenderer()
        if sys.stderr.isatty()
        else structlog.processors.JSONRenderer()
    )
    stamp = [structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso")]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *stamp,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(processor=renderer, foreign_pre_chain=stamp)
    )
    logging.basicConfig(handlers=[handler], level=level.upper(), force=True)


def run(args: argparse.Namespace) -> None:
    """Serve the proxy until interrupted."""
    config = config_from_args(args)
    configure_logging(args.log_level)
    uvicorn.run(
        create_app(config),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        # The loopback-only rule for node management must see the real peer address.
        proxy_headers=False,
        access_log=False,
        log_config=None,
    )
