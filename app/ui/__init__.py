"""The gradio web UI: `splitfuse ui [MODEL]` (engine in this process) or `splitfuse ui --api URL`.

Needs the `ui` extra (gradio): pip install 'splitfuse[ui]', or scripts/install.sh --ui.
"""

from __future__ import annotations

import signal
from types import FrameType

from app.ui.backend import ChatBackend
from app.ui.page import CSS, THEME, build_page


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_ui(backend: ChatBackend, host: str, port: int) -> None:
    """Serve the chat page until SIGINT or SIGTERM, then release the backend."""
    # As a container's PID 1 the process would ignore SIGTERM; gradio stops on KeyboardInterrupt.
    signal.signal(signal.SIGTERM, _interrupt)
    page = build_page(backend)
    try:
        page.queue(default_concurrency_limit=None).launch(
            server_name=host,
            server_port=port,
            theme=THEME,
            css=CSS,
            ssr_mode=False,
            show_error=False,
            footer_links=["api"],
        )
    finally:
        page.close()
        backend.close()
