"""InternLM2 tool calls:
`<|action_start|><|plugin|>\\n{"name": ..., "parameters": {...}}<|action_end|>`."""

from __future__ import annotations

from app.tools.base import TaggedToolStream, ToolParser


class InternLM2ToolParser(ToolParser):
    """Plugin actions; other actions (e.g. `<|interpreter|>`) stay content."""

    name = "internlm2"
    start_tag = "<|action_start|><|plugin|>"
    end_tag = "<|action_end|>"

    def stream(self) -> TaggedToolStream:
        return TaggedToolStream(self.start_tag, self.end_tag)
