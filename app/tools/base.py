"""Tool-call parsing: OpenAI-shaped results and the streaming machinery every format shares.

Each format is one streaming state machine; `parse` runs the same machine over the whole text, so
streamed and non-streamed results agree by construction. A call is emitted only once its JSON is
complete and valid (malformed calls come out as content), so nothing emitted is ever retracted.
"""

from __future__ import annotations

import json
import secrets
import string
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

_ID_ALPHABET = string.ascii_letters + string.digits


def new_call_id() -> str:
    """An id shaped like OpenAI's: "call_" and 24 random alphanumerics."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


@dataclass
class ToolCall:
    """One complete function call; `arguments` is JSON text."""

    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict[str, Any]:
        """The `message.tool_calls[i]` object of a chat completion."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass
class ParsedOutput:
    """Model text split into content (None if empty or only whitespace) and tool calls."""

    content: str | None
    tool_calls: list[ToolCall]


@dataclass
class StreamDelta:
    """What one fed delta releases: a content delta and/or OpenAI `delta.tool_calls` entries."""

    content: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


class ToolStream(ABC):
    """Streaming state for one generation: feed() text deltas in order, then finish() once."""

    def __init__(self) -> None:
        self._buffer = ""  # received text not yet released
        self._out_content: list[str] = []
        self._out_calls: list[dict[str, Any]] = []
        self._held_space = ""  # leading whitespace, released only once real content follows
        self._content_started = False
        self._num_calls = 0

    def feed(self, delta_text: str) -> StreamDelta:
        self._buffer += delta_text
        self._advance(final=False)
        return self._take()

    def finish(self) -> StreamDelta:
        """Flush at the end of generation: whatever is still held is decided now."""
        self._advance(final=True)
        return self._take()

    @abstractmethod
    def _advance(self, final: bool) -> None:
        """Release as much of `_buffer` as is decided; with `final`, all of it."""

    def _emit_content(self, text: str) -> None:
        if not text:
            return
        if not self._content_started:
            # Whitespace around calls alone is not content (OpenAI sends null then).
            self._held_space += text
            if self._held_space.isspace():
                return
            text, self._held_space = self._held_space, ""
            self._content_started = True
        self._out_content.append(text)

    def _emit_call(self, name: str, arguments: str) -> None:
        index = self._num_calls
        self._num_calls += 1
        self._out_calls.append(
            {
                "index": index,
                "id": new_call_id(),
                "type": "function",
                "function": {"name": name, "arguments": ""},
            }
        )
        self._out_calls.append({"index": index, "function": {"arguments": arguments}})

    def _take(self) -> StreamDelta:
        delta = StreamDelta("".join(self._out_content) or None, self._out_calls)
        self._out_content, self._out_calls = [], []
        return delta


class ToolParser(ABC):
    """A model family's tool-call format."""

    name: ClassVar[str]

    @abstractmethod
    def stream(self) -> ToolStream:
        """A fresh streaming state for one generation."""

    def parse(self, text: str) -> ParsedOutput:
        state = self.stream()
        return merge_deltas([state.feed(text), state.finish()])


def merge_deltas(deltas: list[StreamDelta]) -> ParsedOutput:
    """Join streamed deltas the way an OpenAI client does: content concatenated, tool calls
    merged by index (id and name from the first delta, arguments concatenated)."""
    content = "".join(d.content for d in deltas if d.content)
    calls: dict[int, ToolCall] = {}
    for delta in deltas:
        for part in delta.tool_calls:
            call = calls.get(part["index"])
            if call is None:
                call = calls[part["index"]] = ToolCall(part["id"], part["function"]["name"], "")
            call.arguments += part["function"]["arguments"]
    return ParsedOutput(content or None, [calls[i] for i in sorted(calls)])


def parse_call_json(text: str) -> tuple[str, str] | None:
    """(name, arguments JSON) from `{"name": ..., "arguments" | "parameters": {...}}`, or None.
    Arguments are re-serialized (json.dumps, non-ASCII kept) so every format agrees."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters"))
    if not value["name"] or not isinstance(arguments, dict):
        return None
    return value["name"], json.dumps(arguments, ensure_ascii=False)


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper start of `tag` (what to hold back)."""
    for size in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


class TaggedToolStream(ToolStream):
    """Calls written as `start_tag JSON end_tag` anywhere in the text (Hermes, InternLM2)."""

    def __init__(self, start_tag: str, end_tag: str) -> None:
        super().__init__()
        self._start_tag = start_tag
        self._end_tag = end_tag
        self._in_call = False
        self._search_from = 0  # where to resume looking for the end tag

    def _advance(self, final: bool) -> None:
        while True:
            if not self._in_call:
                at = self._buffer.find(self._start_tag)
                if at < 0:
                    keep = 0 if final else partial_suffix(self._buffer, self._start_tag)
                    self._emit_content(self._buffer[: len(self._buffer) - keep])
                    self._buffer = self._buffer[len(self._buffer) - keep :]
                    return
                self._emit_content(self._buffer[:at])
                self._buffer = self._buffer[at + len(self._start_tag) :]
                self._in_call, self._search_from = True, 0
                continue
            at = self._buffer.find(self._end_tag, self._search_from)
            if at >= 0:
                self._close_call(self._buffer[:at], self._end_tag)
                self._buffer = self._buffer[at + len(self._end_tag) :]
                self._in_call = False
                continue
            if final:
                # Generation stopped before the end tag: a complete JSON body still counts.
                self._close_call(self._buffer, "")
                self._buffer = ""
                return
            self._search_from = max(0, len(self._buffer) - len(self._end_tag) + 1)
            return

    def _close_call(self, body: str, end_tag: str) -> None:
        call = parse_call_json(body)
        if call is None:
            self._emit_content(self._start_tag + body + end_tag)
        else:
            self._emit_call(*call)
