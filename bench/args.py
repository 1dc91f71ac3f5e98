"""argparse value types shared by the benchmark scripts: a wrong value is a one-line usage
error, not a traceback after the model is built."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeVar

DTYPES = ["auto", "float32", "float16", "bfloat16"]
Number = TypeVar("Number", int, float)


def _at_least(minimum: Number, kind: type[Number]) -> Callable[[str], Number]:
    def parse(text: str) -> Number:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value >= minimum:  # NaN fails too
            raise argparse.ArgumentTypeError(f"{text} is below {minimum}")
        return value

    return parse


positive_int = _at_least(1, int)
non_negative_int = _at_least(0, int)
non_negative_float = _at_least(0.0, float)


def int_list(item: Callable[[str], int] = positive_int) -> Callable[[str], list[int]]:
    """Comma-separated integers, each checked by `item`."""

    def parse(text: str) -> list[int]:
        return [item(part) for part in text.split(",")]

    return parse
