"""Grammars that force tool calls (tool_choice "required" or a named function).

The output must be one call (or, with parallel calls, one or more) in the parser's own format,
with arguments valid against the function's `parameters` schema, so the parser always finds them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from app.engine.grammar import GrammarError, GrammarSpec, json_schema_ebnf
from app.tools.hermes import HermesToolParser
from app.tools.internlm2 import InternLM2ToolParser


@dataclass(frozen=True)
class _CallFormat:
    begin: str  # text before the call's JSON
    arguments_key: str
    end: str  # text after it
    separator: str  # between parallel calls


_FORMATS = {
    "hermes": _CallFormat(f"{HermesToolParser.start_tag}\n", "arguments",
                          f"\n{HermesToolParser.end_tag}", "\n"),
    "llama3": _CallFormat("", "parameters", "", "; "),
    "internlm2": _CallFormat(f"{InternLM2ToolParser.start_tag}\n", "parameters",
                             InternLM2ToolParser.end_tag, "\n"),
}  # fmt: skip
_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def tool_call_spec(
    tools: list[dict[str, Any]],
    tool_choice: str | dict[str, Any],
    parser_name: str,
    parallel_tool_calls: bool,
) -> GrammarSpec:
    """An EBNF spec whose every output is well-formed call(s) for `parser_name`'s parser.
    Bad tools, tool_choice or parameter schemas raise GrammarError (a ValueError)."""
    call_format = _FORMATS.get(parser_name)
    if call_format is None:
        raise GrammarError(f"no tool-call grammar for parser {parser_name!r}")
    functions = _chosen_functions(tools, tool_choice)
    alternatives: list[str] = []
    rules: list[str] = []
    for i, (name, parameters) in enumerate(functions):
        head = f'{call_format.begin}{{"name": {json.dumps(name, ensure_ascii=False)}, '
        head += f'"{call_format.arguments_key}": '
        tail = "}" + call_format.end
        rules.append(f"tool_{i} ::= {_literal(head)} t{i}_root {_literal(tail)}")
        rules.append(json_schema_ebnf(parameters, f"t{i}_"))
        alternatives.append(f"tool_{i}")
    root = "root ::= call"
    if parallel_tool_calls:
        root += f" ({_literal(call_format.separator)} call)*"
    return GrammarSpec.for_ebnf("\n".join([root, "call ::= " + " | ".join(alternatives), *rules]))


def _chosen_functions(
    tools: list[dict[str, Any]], tool_choice: str | dict[str, Any]
) -> list[tuple[str, dict[str, Any]]]:
    """(name, parameters schema) of every function the choice allows."""
    if not isinstance(tools, list) or not tools:
        raise GrammarError("tools must be a non-empty list when tool_choice forces a call")
    functions: dict[str, dict[str, Any]] = {}
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name or tool.get("type", "function") != "function":
            raise GrammarError('each tool must be {"type": "function", "function": {"name": ...}}')
        parameters = function.get("parameters")  # type: ignore[union-attr]
        functions[name] = _NO_PARAMETERS if parameters is None else parameters
    if tool_choice == "required":
        return list(functions.items())
    chosen = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = chosen.get("name") if isinstance(chosen, dict) else None
    if not isinstance(name, str):
        raise GrammarError(
            'tool_choice must be "required" or {"type": "function", "function": {"name": ...}}'
        )
    if name not in functions:
        raise GrammarError(f"tool_choice names function {name[:100]!r}, which is not in tools")
    return [(name, functions[name])]


def _literal(text: str) -> str:
    # JSON string escapes are EBNF string escapes.
    return json.dumps(text, ensure_ascii=False)
