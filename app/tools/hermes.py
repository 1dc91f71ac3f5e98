"""Hermes / Qwen2.5 tool calls: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`."""

from __future__ import annotations

from app.tools.base import TaggedToolStream, ToolParser


class HermesToolParser(ToolParser):
    """Any number of `<tool_call>` blocks, with content allowed around them."""

    name = "hermes"
    start_tag = "<tool_call>"
    end_tag = "</tool_call>"

    def stream(self) -> TaggedToolStream:
        return TaggedToolStream(self.start_tag, self.end_tag)
