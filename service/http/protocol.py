"""Wire models of the gateway's HTTP API (OpenAI chat subset, admin API).

The chat request model is an allow-list: fields not declared here (engine-internal ones such as
`vllm_xargs` or `lora_request`, and any unknown extra) are dropped at parse time, so nothing the
client sends can reach vLLM unless it is named below. Responses from the engine are forwarded as
JSON dicts (see `fedpersona.service.http.chat`), not re-modelled, so new OpenAI fields pass through
untouched.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fedpersona.adapters.preferences import REWARD_MIX_MAX, REWARD_MIX_MIN, reward_mix_problem
from fedpersona.service.registry import ProxyAlpha
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

# The engine's seed is a 64-bit integer; larger ones came back as vLLM's raw validation dump.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
# No context is this long; keeps token counts in the engine's integer range.
MAX_TOKENS_LIMIT = 2**31 - 1


def _encodable(value: str) -> str:
    """Refuse text that is not valid Unicode: JSON's `\\ud800` escapes decode to lone
    surrogates, which no UTF-8 encoder (ours, the tokenizer's, the engine's) accepts."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"contains a lone UTF-16 surrogate at position {e.start}") from None
    return value


Text = Annotated[str, AfterValidator(_encodable)]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: Text | list[TextPart]
    name: Text | None = Field(default=None, max_length=64)

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


StopParam = (
    Annotated[Text, Field(min_length=1, max_length=256)]
    | Annotated[list[Annotated[Text, Field(max_length=256)]], Field(max_length=4)]
)


class ChatCompletionRequest(BaseModel):
    """The OpenAI chat-completions request fields the gateway accepts and forwards."""

    model_config = ConfigDict(extra="ignore")

    model: Text = Field(min_length=1, max_length=256)
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    stop: StopParam | None = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    n: int = Field(default=1, ge=1, le=1, description="only n=1 is served")
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = Field(default=None, max_length=256, description="accepted, not forwarded")

    @field_validator("messages")
    @classmethod
    def _no_empty_part_lists(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        for message in messages:
            if isinstance(message.content, list) and not message.content:
                raise ValueError("message content must not be an empty list")
        return messages

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs=true")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        return self

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def engine_body(self, *, model: str) -> dict[str, Any]:
        """The body sent to vLLM: only declared fields, `model` replaced, nothing engine-internal.

        Streams always ask the engine for usage (the gateway counts tokens);
        `fedpersona.service.http.chat`
        strips it again when the client did not ask.
        """
        body = self.model_dump(exclude_none=True, exclude={"user", "stream_options", "n"})
        body["model"] = model
        body["messages"] = [_message_body(m) for m in self.messages]
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        return body


def _message_body(message: ChatMessage) -> dict[str, Any]:
    body: dict[str, Any] = {"role": message.role, "content": message.text()}
    if message.name is not None:
        body["name"] = message.name
    return body


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "fedpersona"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- admin API -------------------------------------------------------------------------------


def _wire_reward_mix(value: float) -> float:
    problem = reward_mix_problem(value)
    if problem is not None:
        raise PydanticCustomError("reward_mix", problem)
    return value


# A user's PFIT reward mix: the same check and words as the CLI and the trainer.
RewardMix = Annotated[
    float,
    Strict(),  # `true` or "0.5" is a client's mistake, not 1 or 0.5
    AfterValidator(_wire_reward_mix),
    WithJsonSchema(
        {
            "type": "number",
            "minimum": REWARD_MIX_MIN,
            "maximum": REWARD_MIX_MAX,
            "description": "reward = reward_mix * helpfulness + (1 - reward_mix) * safety",
        }
    ),
]


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Text = Field(min_length=1, max_length=63)
    proxy_alpha: ProxyAlpha | None = None
    issue_key: bool = Field(default=True, description="also issue a first API key")


class UserUpdate(BaseModel):
    """The settings to change; at least one, the others stay as they are."""

    model_config = ConfigDict(extra="forbid")
    proxy_alpha: ProxyAlpha | None = None
    reward_mix: RewardMix | None = None

    @model_validator(mode="after")
    def _something(self) -> UserUpdate:
        if self.proxy_alpha is None and self.reward_mix is None:
            raise PydanticCustomError(
                "nothing_to_change", "give at least one of proxy_alpha, reward_mix"
            )
        return self


class UserOut(BaseModel):
    name: str
    created_at: float
    proxy_alpha: float
    reward_mix: float = Field(
        description="the user's PFIT reward mix (the default where they never set one)"
    )
    active_keys: int


class KeyOut(BaseModel):
    key_id: str
    user: str
    created_at: float
    revoked_at: float | None


class IssuedKeyOut(BaseModel):
    key_id: str
    user: str
    api_key: str = Field(description="shown once; only its hash is stored")


class UserCreated(BaseModel):
    user: UserOut
    key: IssuedKeyOut | None
