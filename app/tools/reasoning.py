"""Reasoning sections: split `<think>...</think>` from the answer, streaming or not."""

from __future__ import annotations

from enum import Enum

from app.tools.base import partial_suffix


class _State(Enum):
    START = "start"  # deciding whether the output opens with the start tag
    REASONING = "reasoning"
    CONTENT = "content"


class ReasoningParser:
    """Reasoning is the text from the start tag (or, with `starts_in_reasoning`, from the very
    beginning: the template already opened it) to the end tag; the rest is content."""

    def __init__(
        self, start: str = "<think>", end: str = "</think>", starts_in_reasoning: bool = False
    ) -> None:
        self.start = start
        self.end = end
        self.starts_in_reasoning = starts_in_reasoning

    def stream(self) -> ReasoningStream:
        return ReasoningStream(self)

    def parse(self, text: str) -> tuple[str | None, str | None]:
        """(reasoning_content, content), each None when empty."""
        state = self.stream()
        reasoning, content = zip(state.feed(text), state.finish(), strict=True)
        return "".join(r for r in reasoning if r) or None, "".join(c for c in content if c) or None

    def reasoning_ended(self, text: str) -> bool:
        """Whether output `text` is past any reasoning section, i.e. a grammar may apply now.

        Without `starts_in_reasoning` an output that has not opened a section (the empty one too)
        counts as ended: a grammar applied from the first token then rules reasoning out.
        """
        if self.starts_in_reasoning:
            return self.end in text
        head = text.lstrip()
        if head.startswith(self.start):
            return self.end in head[len(self.start) :]
        return not head or not self.start.startswith(head)


class ReasoningStream:
    """Streaming state: feed() deltas, then finish(); each returns (reasoning, content) deltas."""

    def __init__(self, parser: ReasoningParser) -> None:
        self._parser = parser
        self._state = _State.START
        self._buffer = ""
        self._strip_leading = True  # drop whitespace opening the current section
        self._reasoning: list[str] = []
        self._content: list[str] = []

    @property
    def ended(self) -> bool:
        """True once the reasoning section (if any) is over, as far as the text fed shows."""
        return self._state is _State.CONTENT

    def feed(self, delta_text: str) -> tuple[str | None, str | None]:
        self._buffer += delta_text
        self._advance(final=False)
        return self._take()

    def finish(self) -> tuple[str | None, str | None]:
        self._advance(final=True)
        return self._take()

    def _advance(self, final: bool) -> None:
        start, end = self._parser.start, self._parser.end
        while True:
            if self._state is _State.START:
                head = self._buffer.lstrip()
                if head.startswith(start):
                    self._buffer = head[len(start) :]
                    self._state = _State.REASONING
                elif final or (head and not start.startswith(head)):
                    # No opening tag: all reasoning if the template opened it, else all content.
                    in_reasoning = self._parser.starts_in_reasoning
                    self._state = _State.REASONING if in_reasoning else _State.CONTENT
                    self._strip_leading = in_reasoning
                else:
                    return
            elif self._state is _State.REASONING:
                at = self._buffer.find(end)
                if at >= 0:
                    self._emit(self._reasoning, self._buffer[:at])
                    self._buffer = self._buffer[at + len(end) :]
                    self._state, self._strip_leading = _State.CONTENT, True
                    continue
                keep = 0 if final else partial_suffix(self._buffer, end)
                self._emit(self._reasoning, self._buffer[: len(self._buffer) - keep])
                self._buffer = self._buffer[len(self._buffer) - keep :]
                return
            else:
                self._emit(self._content, self._buffer)
                self._buffer = ""
                return

    def _emit(self, out: list[str], text: str) -> None:
        if self._strip_leading:
            text = text.lstrip()
            if not text:
                return
            self._strip_leading = False
        out.append(text)

    def _take(self) -> tuple[str | None, str | None]:
        reasoning, content = "".join(self._reasoning) or None, "".join(self._content) or None
        self._reasoning, self._content = [], []
        return reasoning, content
