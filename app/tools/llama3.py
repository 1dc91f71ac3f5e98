"""Llama 3.1 JSON tool calls: `{"name": ..., "parameters": {...}}`, optionally after
`<|python_tag|>`, several separated by `;`.

The calls must open the output (after whitespace); the first text that is not a call ends them and
everything from there on is content. Output that does not open with a valid call is all content.
"""

from __future__ import annotations

import re
from enum import Enum

from app.tools.base import ToolParser, ToolStream, parse_call_json

PYTHON_TAG = "<|python_tag|>"
_LEAD = re.compile(r"\s*(?:" + re.escape(PYTHON_TAG) + r"\s*)?")
_SEPARATOR = re.compile(r"\s*(?:;\s*)?")


class _State(Enum):
    START = "start"  # before the first call: whitespace and the python tag are held
    OBJECT = "object"  # inside a JSON object that may be a call
    BETWEEN = "between"  # after a call: a separator and another call may follow
    CONTENT = "content"  # decided: the rest is content


class Llama3ToolParser(ToolParser):
    """Llama 3.1 / 3.2 / 3.3 JSON function calls."""

    name = "llama3"

    def stream(self) -> Llama3ToolStream:
        return Llama3ToolStream()


class Llama3ToolStream(ToolStream):
    """Holds back only what may still be a call: the lead-in, an open object, a separator."""

    def __init__(self) -> None:
        super().__init__()
        self._state = _State.START
        self._lead = ""  # text before the current object, released as content if it is no call
        # Incremental JSON scan of the current object, which starts at _buffer[0].
        self._pos = self._depth = 0
        self._in_string = self._escaped = self._expect_key = False

    def _advance(self, final: bool) -> None:
        while True:
            if self._state is _State.CONTENT:
                self._emit_content(self._buffer)
                self._buffer = ""
                return
            if self._state is _State.OBJECT:
                end = self._scan_object()
                if end == 0 and not final:
                    return
                call = parse_call_json(self._buffer[:end]) if end > 0 else None
                if call is None:
                    self._buffer, self._lead = self._lead + self._buffer, ""
                    self._state = _State.CONTENT
                    continue
                self._emit_call(*call)
                self._buffer, self._lead = self._buffer[end:], ""
                self._state = _State.BETWEEN
                continue
            pattern = _LEAD if self._state is _State.START else _SEPARATOR
            match = pattern.match(self._buffer)
            lead_end = match.end() if match else 0
            rest = self._buffer[lead_end:]
            if rest.startswith("{"):
                self._lead, self._buffer = self._buffer[:lead_end], rest
                self._state = _State.OBJECT
                self._pos = self._depth = 0
                self._in_string = self._escaped = self._expect_key = False
                continue
            still_open = rest == "" or (self._state is _State.START and PYTHON_TAG.startswith(rest))
            if still_open and not final:
                return
            self._state = _State.CONTENT

    def _scan_object(self) -> int:
        """Advance the scan: the index just past the balanced object, 0 while it is incomplete,
        -1 as soon as the text after `{` cannot be a JSON object."""
        text = self._buffer
        while self._pos < len(text):
            ch = text[self._pos]
            self._pos += 1
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
                continue
            if self._expect_key and not ch.isspace():
                self._expect_key = False
                if ch not in '"}':
                    return -1
            if ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
                self._expect_key = self._pos == 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return self._pos
        return 0
