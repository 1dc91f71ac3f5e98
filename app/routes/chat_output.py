"""One chat choice's text split into reasoning, content and OpenAI tool calls, delta by delta;
the non-streamed message runs the same machines over the whole text, so both agree."""

from __future__ import annotations

from typing import Any

from app.tools import ReasoningParser, StreamDelta, ToolParser, merge_deltas


class ChoiceParser:
    """Feed a choice's text deltas, then finish() once; each returns an OpenAI `delta` dict
    (reasoning_content, content, tool_calls: whichever it has)."""

    def __init__(self, tools: ToolParser | None, reasoning: ReasoningParser | None) -> None:
        self._tools = tools.stream() if tools is not None else None
        self._reasoning = reasoning.stream() if reasoning is not None else None
        self.called = False  # whether any tool call came out

    def feed(self, text: str) -> dict[str, Any]:
        reasoning = None
        if self._reasoning is not None:
            reasoning, text = self._reasoning.feed(text)
        return self._delta(reasoning, self._tool_delta(text or "", final=False))

    def finish(self) -> dict[str, Any]:
        reasoning, text = self._reasoning.finish() if self._reasoning is not None else (None, "")
        return self._delta(reasoning, self._tool_delta(text or "", final=True))

    def finish_reason(self, engine_reason: str | None) -> str | None:
        """`tool_calls` for a choice that stopped after calling tools, as OpenAI reports it."""
        return "tool_calls" if self.called and engine_reason == "stop" else engine_reason

    def message(self, text: str) -> dict[str, Any]:
        """The whole text as a `message` object (role included)."""
        parts = [self.feed(text), self.finish()]
        calls = merge_deltas([StreamDelta(None, p.get("tool_calls", [])) for p in parts])
        content = "".join(p.get("content", "") for p in parts)
        message: dict[str, Any] = {"role": "assistant", "content": content or None}
        if calls.tool_calls:
            message["tool_calls"] = [call.to_openai() for call in calls.tool_calls]
        elif message["content"] is None:
            message["content"] = ""
        if self._reasoning is not None:
            reasoning = "".join(p.get("reasoning_content", "") for p in parts)
            message["reasoning_content"] = reasoning or None
        return message

    def _tool_delta(self, text: str, final: bool) -> StreamDelta:
        if self._tools is None:
            return StreamDelta(text or None)
        delta = self._tools.feed(text)
        if final:
            last = self._tools.finish()
            content = (delta.content or "") + (last.content or "")
            delta = StreamDelta(content or None, delta.tool_calls + last.tool_calls)
        return delta

    def _delta(self, reasoning: str | None, tools: StreamDelta) -> dict[str, Any]:
        delta: dict[str, Any] = {}
        if reasoning:
            delta["reasoning_content"] = reasoning
        if tools.content:
            delta["content"] = tools.content
        if tools.tool_calls:
            delta["tool_calls"] = tools.tool_calls
            self.called = True
        return delta
