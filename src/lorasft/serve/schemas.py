"""Request bodies of the OpenAI API subset the server answers, and its error body.

Unknown fields are ignored (clients send many optional ones, and OpenAI ignores some itself);
a field a client relies on, given a value lorasft cannot honour (`n` > 1, `logprobs`, `echo`, a
JSON `response_format`, tools, a logit bias, penalties, `best_of` > 1, a `suffix`), is refused
with a 400 that names it, never dropped in silence. `max_completion_tokens` (the name today's
SDKs send) and `max_tokens` (its older name) both bound the answer: given both, the smaller.
`ignore_eos` (vLLM's and llama.cpp's extension, sent by load generators) generates past the
run's stop tokens up to the bound.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class APIError(Exception):
    """A request the server refuses: becomes an OpenAI-style error body with this status."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind, self.headers = kind, headers


def error_body(message: str, kind: str, param: str | None = None, code: Any = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)
    logprobs: Any = None
    max_completion_tokens: int | None = Field(default=None, ge=1)
    ignore_eos: bool = False
    # what a client relies on and lorasft does not do: refused when set to anything but the
    # value that means "not used"
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    logit_bias: dict[str, float] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    best_of: int | None = None

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and v.get("type", "text") != "text":
            raise ValueError(f"response_format type {v.get('type')!r} is not supported by "
                             "lorasft serve (plain text only)")  # fmt: skip
        return v

    @field_validator("tools", "functions", "logit_bias")
    @classmethod
    def _unused(cls, v: Any, info) -> Any:
        if v:
            raise ValueError(f"{info.field_name} is not supported by lorasft serve")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, v: Any) -> Any:
        if v not in (None, "none", "auto"):
            raise ValueError("tool_choice: lorasft serve calls no tools")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: float, info) -> float:
        if v != 0:
            raise ValueError(f"{info.field_name} is not supported by lorasft serve (give 0)")
        return v

    @field_validator("best_of")
    @classmethod
    def _one_best(cls, v: int | None) -> int | None:
        if v not in (None, 1):
            raise ValueError("best_of > 1 is not supported by lorasft serve")
        return v

    def answer_bound(self) -> int | None:
        """The answer's token bound: max_completion_tokens and max_tokens, the smaller if both."""
        given = [x for x in (self.max_completion_tokens, self.max_tokens) if x is not None]
        return min(given) if given else None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str] | None:
        stops = [v] if isinstance(v, str) else v
        if stops is not None and (len(stops) > 4 or any(not s for s in stops)):
            raise ValueError("stop takes at most 4 non-empty strings")
        return stops

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: Any) -> Any:
        if v not in (None, False):
            raise ValueError("logprobs are not supported by lorasft serve")
        return v


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(default=None, ge=1)
    echo: bool = False
    suffix: str | None = None

    def answer_bound(self) -> int:
        """As chat's, and 16 when neither is given (OpenAI's default for completions)."""
        bound = super().answer_bound()
        return 16 if bound is None else bound

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported by lorasft serve")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("suffix (insertion) is not supported by lorasft serve")
        return v

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str:
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("give one prompt string (batches of prompts are not supported)")
            v = v[0]
        return v
