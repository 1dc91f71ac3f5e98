"""Chat templates rendered in Jinja's immutable sandbox, with a time and an output-size cap.

The model's own template is used unless `--chat-template` names a built-in (app/templates) or a
file. A template supplied in a request is refused unless the server allows it.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"


# Stand-ins used to find where one turn's rendering ends and the next one's begins.
_USER, _REPLY = "\x00user-turn\x00", "\x00assistant-reply\x00"


class ChatTemplateError(ValueError):
    """A template that cannot be loaded or rendered; the message is safe to show a client."""


def builtin_templates() -> list[str]:
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.jinja"))


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False) -> str:
    # An indent of a billion spaces is a memory bomb, not formatting.
    indent = None if indent is None else min(int(indent), 16)
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, plus: `'x' * n` and `n ** m` cannot build giant values (the
    size cap on the output would come too late, after the memory is gone)."""

    intercepted_binops = frozenset({"*", "**"})

    def __init__(self, max_chars: int):
        super().__init__(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        self.max_chars = max_chars

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for items, times in ((left, right), (right, left)):
                if (
                    isinstance(items, (str, list, tuple))
                    and isinstance(times, int)
                    and len(items) * times > self.max_chars
                ):
                    raise SecurityError("the template builds a value past the size cap")
        if operator == "**" and isinstance(right, int) and abs(right) > 1024:
            raise SecurityError("the template raises to a power over 1024")
        return super().call_binop(context, operator, left, right)


def _environment(max_chars: int) -> ImmutableSandboxedEnvironment:
    env = _Sandbox(max_chars)
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _deadline_tracer(deadline: float, timeout: float) -> Any:
    def trace(frame: Any, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise ChatTemplateError(f"rendering the chat template took longer than {timeout} s")
        return trace

    return trace


def resolve_template_source(name_or_file: str) -> str:
    """A built-in template's name or a file path -> the Jinja source."""
    if name_or_file in builtin_templates():
        return (TEMPLATE_DIR / f"{name_or_file}.jinja").read_text()
    path = Path(name_or_file)
    if path.is_file():
        return path.read_text()
    raise ChatTemplateError(
        f"chat template {name_or_file!r} is neither a built-in "
        f"({', '.join(builtin_templates())}) nor a file"
    )


class ChatTemplate:
    """A compiled chat template plus the special tokens it may reference."""

    def __init__(
        self,
        source: str,
        bos_token: str = "",
        eos_token: str = "",
        timeout: float = 2.0,
        max_chars: int = 1_000_000,
        untrusted: bool = False,
    ):
        try:
            self._template = _environment(max_chars).from_string(source)
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"invalid chat template: {exc}") from None
        except (RecursionError, MemoryError, ValueError, TypeError) as exc:
            raise ChatTemplateError(f"invalid chat template: {type(exc).__name__}") from None
        self.source = source
        self.bos_token, self.eos_token = bos_token, eos_token
        self.timeout, self.max_chars = timeout, max_chars
        self.untrusted = untrusted

    @classmethod
    def for_tokenizer(
        cls,
        tokenizer: Any,
        override: str | None = None,
        timeout: float = 2.0,
        max_chars: int = 1_000_000,
    ) -> ChatTemplate:
        source = resolve_template_source(override) if override else tokenizer.chat_template
        if not source:
            source = resolve_template_source("chatml")
        return cls(source, tokenizer.bos_token or "", tokenizer.eos_token or "", timeout, max_chars)

    def with_source(self, source: str) -> ChatTemplate:
        """A template from a request: rendered under a line-by-line deadline."""
        return ChatTemplate(
            source, self.bos_token, self.eos_token, self.timeout, self.max_chars, untrusted=True
        )

    def render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render, stopping when the output or the time exceeds the caps."""
        context = {
            **kwargs,
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
            "tools": tools,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
        }
        deadline = time.monotonic() + self.timeout
        parts: list[str] = []
        size = 0
        # A loop that writes nothing never reaches the checks below; for a template from a
        # request, a tracer checks the deadline on every line the template's code runs.
        previous = sys.gettrace()
        if self.untrusted:
            sys.settrace(_deadline_tracer(deadline, self.timeout))
        try:
            for chunk in self._template.generate(**context):
                parts.append(chunk)
                size += len(chunk)
                if size > self.max_chars:
                    raise ChatTemplateError(
                        f"the rendered chat template exceeds {self.max_chars} characters"
                    )
                if time.monotonic() > deadline:
                    raise ChatTemplateError(
                        f"rendering the chat template took longer than {self.timeout} s"
                    )
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template error: {exc}") from None
        except Exception as exc:  # a template is code from outside: any failure is its own
            raise ChatTemplateError(f"chat template error: {type(exc).__name__}") from None
        finally:
            if self.untrusted:
                sys.settrace(previous)
        return "".join(parts)

    def render_turn(self, messages: list[dict[str, Any]], history_ends_with: str | None) -> str:
        """A session turn's text: the whole prompt for the first turn (`history_ends_with`
        None), else what follows the earlier reply in the conversation and asks for the next
        one. Later turns render [user, reply] and [user, reply, *messages] and take the
        difference; the end-of-turn text the template puts after the reply is kept, minus what
        the model already produced (`history_ends_with`: its end-of-turn token, usually)."""
        if history_ends_with is None:
            return self.render(messages, add_generation_prompt=True)
        base = [{"role": "user", "content": _USER}, {"role": "assistant", "content": _REPLY}]
        before = self.render(base, add_generation_prompt=False)
        after = self.render(base + messages, add_generation_prompt=True)
        if not after.startswith(before):
            raise ChatTemplateError("the chat template does not render turns incrementally")
        tail = before[before.index(_REPLY) + len(_REPLY) :]
        if history_ends_with and tail.startswith(history_ends_with):
            tail = tail[len(history_ends_with) :]
        return tail + after[len(before) :]
