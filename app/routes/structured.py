"""Structured output and tool calling at the HTTP edge: request fields -> a compiled grammar, and
how a chat request's output is parsed into reasoning, content and tool calls."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from app.engine.grammar_spec import GrammarError, GrammarSpec
from app.errors import APIError
from app.routes.chat_output import ChoiceParser
from app.tools import ReasoningParser, ToolParser, get_tool_parser, tool_parser_for_model

if TYPE_CHECKING:
    from app.engine.grammar import CompiledGrammar

_GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
_REASONING = {
    "think": ReasoningParser(),
    "think-open": ReasoningParser(starts_in_reasoning=True),
}


@dataclass(frozen=True)
class OutputParsers:
    """The server's tool-call format and reasoning parser (None: no reasoning section)."""

    tool_parser: ToolParser
    reasoning: ReasoningParser | None

    @classmethod
    def from_settings(cls, ctx: Any) -> OutputParsers:
        """From --tool-call-parser / --reasoning-parser, else from the model (hermes when nothing
        better is known); unknown names raise ValueError at startup."""
        server = ctx.settings.server
        name = server.tool_call_parser
        if not name:
            architectures = getattr(ctx.engine.info.hf_config, "architectures", None) or [""]
            name = tool_parser_for_model(architectures[0], ctx.template.source) or "hermes"
        if server.reasoning_parser and server.reasoning_parser not in _REASONING:
            raise ValueError(
                f"unknown reasoning parser {server.reasoning_parser!r}; "
                f"choose one of {', '.join(_REASONING)}"
            )
        return cls(get_tool_parser(name), _REASONING.get(server.reasoning_parser))


@dataclass(frozen=True)
class ChatPlan:
    """How one chat request's output is constrained (grammar) and parsed."""

    grammar: CompiledGrammar | None
    tool_parser: ToolParser | None  # None when tool calls are not looked for
    reasoning: ReasoningParser | None

    @property
    def parses(self) -> bool:
        return self.tool_parser is not None or self.reasoning is not None

    def choice_parser(self) -> ChoiceParser:
        return ChoiceParser(self.tool_parser, self.reasoning)

    def reasoning_gate(self, tokenizer: Any) -> tuple[list[int] | None, int | None]:
        """(closing ids, opening id) for the engine: the constraint applies only after the
        reasoning section. A template that opens the section gives no opening id (the gate holds
        from the first token); otherwise the model may open one with its first token, which must
        then be a single token (else the constraint applies from the start)."""
        reasoning = self.reasoning
        if self.grammar is None or reasoning is None:
            return None, None
        closing = tokenizer.encode(reasoning.end, add_special_tokens=False)
        if reasoning.starts_in_reasoning:
            return closing, None
        opening = tokenizer.encode(reasoning.start, add_special_tokens=False)
        return (closing, opening[0]) if len(opening) == 1 else (None, None)


def request_spec(body: Any) -> tuple[GrammarSpec | None, str]:
    """The grammar spec a request's response_format or guided_* field asks for, and that field's
    name (for error messages); GrammarError becomes a 400 naming the field."""
    guided = {name: getattr(body, name, None) for name in _GUIDED}
    given = [name for name, value in guided.items() if value is not None]
    fmt = body.response_format
    param = given[0] if given else "response_format"
    try:
        if fmt is not None and given:
            raise GrammarError(f"response_format and {given[0]} cannot both be set")
        if fmt is not None:
            return GrammarSpec.from_response_format(fmt), param
        return GrammarSpec.from_guided(**guided), param
    except GrammarError as exc:
        raise APIError(400, str(exc), param=param) from None


async def compile_spec(ctx: Any, spec: GrammarSpec | None, param: str) -> CompiledGrammar | None:
    """Compile off the event loop under the server's time limit; GrammarError -> 400."""
    if spec is None:
        return None
    compiler = await ctx.engine.get_grammar_compiler()
    timeout = ctx.settings.server.grammar_compile_timeout
    if compiler.limits.compile_timeout_s != timeout:
        compiler.limits = dataclasses.replace(compiler.limits, compile_timeout_s=timeout)
    try:
        return await compiler.compile(spec)
    except GrammarError as exc:
        raise APIError(400, str(exc), param=param) from None


async def request_grammar(ctx: Any, body: Any) -> CompiledGrammar | None:
    """The compiled grammar of a completions or interactive request, if it asks for one."""
    return await compile_spec(ctx, *request_spec(body))


async def chat_plan(ctx: Any, body: Any, parsers: OutputParsers) -> ChatPlan:
    """Grammar and parsers of a chat request: `tool_choice` defaults to auto when tools are
    given; required or a named function forces the call(s) with a grammar."""
    spec, param = request_spec(body)
    choice = body.tool_choice or ("auto" if body.tools else "none")
    if choice == "none":
        return ChatPlan(await compile_spec(ctx, spec, param), None, parsers.reasoning)
    if not body.tools:
        raise APIError(400, "tool_choice needs tools", param="tool_choice")
    if choice != "auto":
        if spec is not None:
            raise APIError(
                400, f"{param} cannot be combined with a forced tool_choice", param="tool_choice"
            )
        if isinstance(choice, str) and choice != "required":
            raise APIError(
                400,
                'tool_choice must be "none", "auto", "required" or a named function',
                param="tool_choice",
            )
        from app.tools.tool_grammar import tool_call_spec  # imports xgrammar: only when used

        try:
            spec = tool_call_spec(
                body.tools, choice, parsers.tool_parser.name, body.parallel_tool_calls
            )
        except GrammarError as exc:
            raise APIError(400, str(exc), param="tool_choice") from None
        param = "tools"
    return ChatPlan(await compile_spec(ctx, spec, param), parsers.tool_parser, parsers.reasoning)
