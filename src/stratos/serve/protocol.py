"""The OpenAI request bodies we accept, and the error shape we answer with.

Unknown fields are ignored, as OpenAI-compatible servers do, so clients that send options we do
not use (``user``, ``presence_penalty=0``...) keep working; the fields we do use are checked
strictly and a wrong one is a 400 that names it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator


class ApiError(Exception):
    """An error the client caused (4xx) or one we report without internals (5xx)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        # OpenAI's error shape, which its clients parse into their exception objects.
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = Field(None, validate_default=True)
    seed: int | None = None
    stream: StrictBool = False
    stream_options: "StreamOptions | None" = None
    ignore_eos: StrictBool = False  # vLLM's extension: generate exactly max_tokens (load tests)
    return_tokens_as_token_ids: StrictBool = False  # vLLM's extension: logprob tokens as "token_id:123"

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: StrictBool = False

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, "only text content parts are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none", "StreamOptions", "ChatMessage"}


def parse(model: type[BaseModel], data: Any) -> Any:
    """Validate a JSON body; the first problem becomes a 400 naming its field."""
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        e = err.errors()[0]
        # Union members show up in the location as type names ('str', 'list[int]'); keep only fields and indices.
        param = ".".join(str(p) for p in e["loc"] if str(p) not in _TYPE_NAMES and "[" not in str(p)
                         and not str(p).startswith("function-"))
        msg = "required field is missing" if e["type"] == "missing" else e["msg"].removeprefix("Value error, ")
        raise ApiError(400, f"{param or 'body'}: {msg}", param=param or None) from None
