"""argparse values shared by the benchmark scripts (numbers: `app.argtypes`): a wrong value is a
one-line usage error, not a traceback after the model is built."""

from __future__ import annotations

from collections.abc import Callable

from app.argtypes import positive_int

DTYPES = ["auto", "float32", "float16", "bfloat16"]


def int_list(item: Callable[[str], int] = positive_int) -> Callable[[str], list[int]]:
    """Comma-separated integers, each checked by `item`."""

    def parse(text: str) -> list[int]:
        return [item(part) for part in text.split(",")]

    return parse
