"""OpenAI's request and response bodies as pydantic models (the subset this server implements).

Requests refuse what they cannot honour with a 400 instead of ignoring it (``n`` > 1,
tools, logprobs); fields OpenAI defines that do not change the answer (``user``,
``presence_penalty`` = 0, ...) are accepted. Responses may carry one extra field,
``biopetals`` (the route taken and tokens/s); OpenAI clients ignore unknown fields.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["ChatMessage", "ChatRequest", "CompletionRequest", "SamplingFields", "Usage"]


class SamplingFields(BaseModel):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(default=1, ge=1, le=1, description="one choice per request")
    user: str | None = None
    presence_penalty: float = Field(default=0.0, ge=0.0, le=0.0, description="not supported beyond 0")
    frequency_penalty: float = Field(default=0.0, ge=0.0, le=0.0, description="not supported beyond 0")
    # vLLM's extension, for benchmarks and tests: generate at least this many tokens (EOS ignored until then)
    min_tokens: int = Field(default=0, ge=0)
    # BioPetals' extension: candidate tokens per step drafted from the prompt (speculative decoding,
    # README "Speculative decoding"); 0: off; absent: the server's default (greedy requests only)
    prompt_lookup: int | None = Field(default=None, ge=0, le=32)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    def check_unsupported(self) -> None:
        """Refuse OpenAI features this server does not implement (a 400, not a silent ignore)."""
        for name in ("tools", "tool_choice", "functions", "logprobs", "top_logprobs", "logit_bias",
                     "response_format", "best_of", "echo", "suffix"):
            value = (self.model_extra or {}).get(name)
            if value not in (None, False, 0, {"type": "text"}, 1 if name == "best_of" else None):
                raise ValueError(f"'{name}' is not supported by this server")

    @property
    def new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(SamplingFields):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str:
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("exactly one prompt per request")
            v = v[0]
        if not v:
            raise ValueError("the prompt is empty")
        return v


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
