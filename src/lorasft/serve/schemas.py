"""Request bodies of the OpenAI API subset the server answers, and its error body.

Unknown fields are ignored (clients send many optional ones, and OpenAI ignores some itself);
a field a client relies on, given a value lorasft cannot honour (`n` > 1, tools, a logit bias,
penalties, `best_of` > 1, a `suffix`; a JSON `response_format` on an engine that cannot constrain
its answer), is refused with a 400 that names it, never dropped in silence. `logprobs` (chat: with `top_logprobs`; completions:
a number of alternatives, with `echo` for the prompt's) are the model's own, before sampling. `max_completion_tokens` (the name today's
SDKs send) and `max_tokens` (its older name) both bound the answer: given both, the smaller.
`ignore_eos` (vLLM's and llama.cpp's extension, sent by load generators) generates past the
run's stop tokens up to the bound.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lorasft.model.generation import GREEDY_BELOW
from lorasft.serve.logprobs import MAX_TOP


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


def surrogate_at(value: Any, where: str = "") -> str | None:
    """Where in a parsed JSON body a string holds a lone UTF-16 surrogate (JSON allows the escape
    "\\ud800"; no tokenizer can encode it), as a dotted path; None when there is none."""
    if isinstance(value, str):
        return where or "body" if any("\ud800" <= c <= "\udfff" for c in value) else None
    items = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, list)
        else ()
    )
    for key, inner in items:
        found = surrogate_at(inner, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


class ValidText(BaseModel):
    """A request body whose strings are all valid Unicode text."""

    @model_validator(mode="before")
    @classmethod
    def _no_surrogates(cls, data: Any) -> Any:
        where = surrogate_at(data)
        if where:
            raise ValueError(f"{where}: a lone UTF-16 surrogate is not text (send valid Unicode)")
        return data


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


REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "tools": (bool, "tools are not supported by lorasft serve"),
    "functions": (bool, "functions are not supported by lorasft serve"),
    "tool_choice": (lambda v: v not in (None, "none", "auto"),
                    "tool_choice: lorasft serve calls no tools"),
    "logit_bias": (bool, "logit_bias is not supported by lorasft serve"),
    "presence_penalty": (bool, "presence_penalty is not supported by lorasft serve (give 0)"),
    "frequency_penalty": (bool, "frequency_penalty is not supported by lorasft serve (give 0)"),
    "best_of": (lambda v: v not in (None, 1), "best_of > 1 is not supported by lorasft serve"),
    "suffix": (bool, "suffix (insertion) is not supported by lorasft serve"),
}  # fmt: skip
"""Fields a client relies on that lorasft does not do: field -> (is the value one that asks for
it, the 400's message). Their "not used" values (None, 0, {}, false, type 'text') pass."""


class Sampling(ValidText):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    """Below GREEDY_BELOW (0 included): greedy, on every engine."""
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)
    logprobs: Any = None
    max_completion_tokens: int | None = Field(default=None, ge=1)
    ignore_eos: bool = False
    # REFUSED, when set to anything but a "not used" value
    response_format: dict[str, Any] | None = None
    """text (the default), json_object or json_schema: the answer constrained to JSON by the
    engine (llama.cpp's grammar, vLLM's structured outputs); the transformers engine refuses it."""
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    logit_bias: dict[str, float] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    best_of: int | None = None

    @field_validator("temperature")
    @classmethod
    def _tiny_is_greedy(cls, v: float) -> float:
        return 0.0 if v < GREEDY_BELOW else v

    @field_validator(*REFUSED, check_fields=False)
    @classmethod
    def _refused(cls, v: Any, info) -> Any:
        """One check for every field in REFUSED (CompletionRequest's echo and suffix too)."""
        used, why = REFUSED[info.field_name]
        if used(v):
            raise ValueError(why)
        return v

    @field_validator("response_format")
    @classmethod
    def _known_format(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        kind = (v or {}).get("type", "text")
        if kind not in ("text", "json_object", "json_schema"):
            raise ValueError(f"type {kind!r}: expected text, json_object or json_schema")
        spec = v.get("json_schema") if kind == "json_schema" else {"schema": {}}
        if not (isinstance(spec, dict) and isinstance(spec.get("schema"), dict)):
            # a ValueError (not TypeError): pydantic turns only that into the 400 naming the field
            raise ValueError("json_schema: give {'name': ..., 'schema': {a JSON schema object}}")  # noqa: TRY004
        return v

    def json_schema(self) -> dict[str, Any] | None:
        """The schema the answer must follow (json_object: any object); None: free text."""
        kind = (self.response_format or {}).get("type", "text")
        if kind == "json_object":
            return {"type": "object"}
        return self.response_format["json_schema"]["schema"] if kind == "json_schema" else None

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


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP)

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, v: int | None, info) -> int | None:
        if v and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return v

    def logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    """Text, or token ids of the served model's tokenizer (as lm-eval sends them)."""
    max_tokens: int | None = Field(default=None, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP)
    echo: bool = False
    """The prompt in front of the answer; with logprobs, the prompt tokens' too."""
    suffix: str | None = None

    def logprobs_wanted(self) -> int | None:
        return self.logprobs

    def answer_bound(self) -> int:
        """As chat's, and 16 when neither is given (OpenAI's default for completions)."""
        bound = super().answer_bound()
        return 16 if bound is None else bound

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list) -> str | list[int]:
        if isinstance(v, list) and v and not isinstance(v[0], int):
            if len(v) != 1:
                raise ValueError("give one prompt (batches of prompts are not supported)")
            v = v[0]
        if isinstance(v, list) and not v:
            raise ValueError("the prompt is empty")
        return v
