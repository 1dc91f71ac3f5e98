"""Tool calling and reasoning: turn model text into OpenAI tool calls and reasoning content."""

from __future__ import annotations

from app.tools.base import (
    ParsedOutput,
    StreamDelta,
    ToolCall,
    ToolParser,
    ToolStream,
    merge_deltas,
    new_call_id,
)
from app.tools.hermes import HermesToolParser
from app.tools.internlm2 import InternLM2ToolParser
from app.tools.llama3 import Llama3ToolParser
from app.tools.reasoning import ReasoningParser, ReasoningStream

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    parser.name: parser for parser in (HermesToolParser, Llama3ToolParser, InternLM2ToolParser)
}

# Architectures whose chat templates speak one format; checked after the template itself.
_ARCHITECTURES = {
    "Qwen2ForCausalLM": "hermes",
    "Qwen2MoeForCausalLM": "hermes",
    "Qwen3ForCausalLM": "hermes",
    "Qwen3MoeForCausalLM": "hermes",
    "InternLM2ForCausalLM": "internlm2",
}


def get_tool_parser(name: str) -> ToolParser:
    """The parser registered as `name`; ValueError listing the known names otherwise."""
    parser = TOOL_PARSERS.get(name)
    if parser is None:
        raise ValueError(
            f"unknown tool-call parser {name!r}; choose one of {', '.join(sorted(TOOL_PARSERS))}"
        )
    return parser()


def tool_parser_for_model(architecture: str, chat_template: str | None) -> str | None:
    """The parser a model's chat template (or, failing that, its architecture) implies."""
    template = chat_template or ""
    if HermesToolParser.start_tag in template:
        return "hermes"
    if InternLM2ToolParser.start_tag in template or "<|plugin|>" in template:
        return "internlm2"
    # Llama 3.1+ templates announce the ipython environment and define the python tag.
    if "<|python_tag|>" in template or ("<|eot_id|>" in template and "ipython" in template):
        return "llama3"
    return _ARCHITECTURES.get(architecture)


__all__ = [
    "TOOL_PARSERS",
    "ParsedOutput",
    "ReasoningParser",
    "ReasoningStream",
    "StreamDelta",
    "ToolCall",
    "ToolParser",
    "ToolStream",
    "get_tool_parser",
    "merge_deltas",
    "new_call_id",
    "tool_parser_for_model",
]
