"""Request bodies of the HTTP API (OpenAI's and lmdeploy's field names), validated by pydantic.

Unknown fields are ignored as OpenAI does; ranges are checked here so that a bad value is a 400
naming the field, before anything is allocated.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
)

from app.engine.config import TOKEN_ID_TEXT


def _no_nul(value: str) -> str:
    # NUL never belongs in chat text, and the interactive route uses it in private markers.
    if "\x00" in value:
        raise ValueError("text must not contain NUL characters")
    return value


Text = Annotated[StrictStr, AfterValidator(_no_nul)]
Probability = Annotated[StrictFloat, Field(ge=0.0, le=1.0)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False


class ContentPart(_Body):
    type: Text
    text: Text | None = None

    @field_validator("type")
    @classmethod
    def _text_only(cls, value: str) -> str:
        if value != "text":
            raise ValueError(f"content part type {value!r} is not supported (only 'text')")
        return value


class FunctionCall(_Body):
    name: Text
    arguments: Text | dict[str, Any] = ""


class ToolCallIn(_Body):
    id: Text | None = None
    type: Literal["function"] = "function"
    function: FunctionCall

    def to_template(self) -> dict[str, Any]:
        """As chat templates expect it: arguments as an object where they are JSON text of one
        (Llama 3.1's template applies `tojson` to them), else as sent."""
        call = self.model_dump()
        arguments = self.function.arguments
        if isinstance(arguments, str):
            try:
                parsed = json.loads(arguments)
            except (ValueError, RecursionError):
                parsed = None
            if isinstance(parsed, dict):
                call["function"]["arguments"] = parsed
        return call


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: Text | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content)

    def to_template(self) -> dict[str, Any]:
        message: dict[str, Any] = {
            "role": "system" if self.role == "developer" else self.role,
            "content": self.text(),
        }
        if self.name is not None:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [call.to_template() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class SamplingFields(_Body):
    """Fields shared by chat and completions requests (vLLM's extensions included)."""

    model: Text | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = Field(1, ge=1)
    temperature: StrictFloat | None = Field(None, ge=0.0, le=2.0)
    top_p: StrictFloat | None = Field(None, gt=0.0, le=1.0)
    top_k: StrictInt | None = Field(None, ge=-1)
    min_p: Probability | None = None
    repetition_penalty: StrictFloat | None = Field(None, gt=0.0, le=10.0)
    presence_penalty: StrictFloat | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: StrictFloat | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, StrictFloat] | None = None
    stop: Text | list[Text] | None = None
    stop_token_ids: list[StrictInt] | None = None
    seed: StrictInt | None = None
    ignore_eos: StrictBool = False
    min_tokens: StrictInt = Field(0, ge=0)
    skip_special_tokens: StrictBool = True
    spaces_between_special_tokens: StrictBool = True
    include_stop_str_in_output: StrictBool = False
    user: Text | None = None
    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | Text | None = None
    guided_regex: Text | None = None
    guided_choice: list[Text] | None = None
    guided_grammar: Text | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not TOKEN_ID_TEXT.fullmatch(key):
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias}")
        return value


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Text | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool = True
    chat_template: Text | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: StrictBool = True


class CompletionRequest(SamplingFields):
    prompt: Text | list[Text] | list[StrictInt] | list[list[StrictInt]]
    # OpenAI's default is 16; None lets the route cap that default instead of refusing it.
    max_tokens: StrictInt | None = Field(None, ge=1, description="default: 16")
    logprobs: StrictInt | None = Field(None, ge=0)
    echo: StrictBool = False
    best_of: StrictInt | None = Field(None, ge=1)
    suffix: Text | None = None


class InteractiveRequest(_Body):
    """lmdeploy's /v1/chat/interactive body."""

    prompt: Text | list[ChatMessage]
    session_id: StrictInt = -1
    interactive_mode: StrictBool = False
    stream: StrictBool = False
    stop: Text | list[Text] | None = None
    request_output_len: StrictInt | None = Field(None, ge=1)
    top_p: StrictFloat = Field(0.8, gt=0.0, le=1.0)
    top_k: StrictInt = Field(40, ge=-1)
    temperature: StrictFloat = Field(0.8, ge=0.0, le=2.0)
    repetition_penalty: StrictFloat = Field(1.0, gt=0.0, le=10.0)
    min_p: Probability = 0.0
    ignore_eos: StrictBool = False
    skip_special_tokens: StrictBool = True
    cancel: StrictBool = False
    seed: StrictInt | None = None
    response_format: dict[str, Any] | None = None


class TokenizeRequest(_Body):
    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True


class DetokenizeRequest(_Body):
    model: Text | None = None
    tokens: list[StrictInt]


class EncodeRequest(_Body):
    """lmdeploy's /v1/encode: text or a list of texts to token ids."""

    input: Text | list[Text]
    do_preprocess: StrictBool = False
    add_bos: StrictBool = True
