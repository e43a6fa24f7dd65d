"""OpenAI wire types: what clients send and what the proxy answers.

Request Structs validate the fields the proxy reads; fields it does not read are kept by
the handlers as raw JSON and passed through. Response Structs mirror the OpenAI spec (the
tests validate against its vendored part, `tests/openai_spec/openai-openapi.subset.json`):
fields the spec requires have no default, so they are always sent (null included); optional
ones default to None and are omitted.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

# A model id as a request names it: OpenAI answers an empty one with a 400 on `model`, not a 404.
ModelId = Annotated[str, msgspec.Meta(min_length=1)]


class _In(msgspec.Struct, kw_only=True):
    """A request body: unknown fields are allowed (OpenAI adds them all the time)."""


class _Out(msgspec.Struct, kw_only=True, omit_defaults=True):
    pass


# ---- chat ---------------------------------------------------------------------------


class StreamOptions(_In):
    include_usage: bool = False


class ChatCompletionRequest(_In):
    model: ModelId
    messages: list[dict[str, Any]]
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    # Read only to check their types; they travel to the upstream as the client sent them.
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    user: str | None = None
    # Their shapes are checked further by the handler (proxy/api/chat.py), which names the bad field.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None


# Fields the proxy consumes itself; everything else in a chat body is passed through.
CHAT_OWN_FIELDS = frozenset({"model", "messages", "stream", "stream_options", "n"})


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ToolCallFunction(_Out):
    name: str
    arguments: str


class ToolCall(_Out):
    id: str
    type: Literal["function"]
    function: ToolCallFunction


class AssistantMessage(_Out):
    role: Literal["assistant"]
    content: str | None
    refusal: str | None
    tool_calls: list[ToolCall] | None = None


class Choice(_Out):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: None


class ChatCompletion(_Out):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


class ToolCallChunkFunction(_Out):
    name: str | None = None
    arguments: str | None = None


class ToolCallChunk(_Out):
    """One tool call's piece in a stream: the first piece has id, type and name; later ones
    only index and more arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: ToolCallChunkFunction | None = None


class Delta(_Out):
    role: str | None = None
    content: str | None = None
    tool_calls: list[ToolCallChunk] | None = None


class ChunkChoice(_Out):
    index: int
    delta: Delta
    finish_reason: str | None
    logprobs: None = None


class ChatCompletionChunk(_Out):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


# ---- images -------------------------------------------------------------------------


class ImageGenerationRequest(_In):
    prompt: str
    model: ModelId | None = None
    n: int = 1
    size: str | None = None
    quality: str | None = None
    style: str | None = None
    response_format: Literal["url", "b64_json"] | None = None
    output_format: str | None = None
    background: str | None = None
    user: str | None = None
    # Extension: reference images for image-to-image, as URLs.
    images: list[str] | None = None


class ImageData(_Out):
    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(_Out):
    created: int
    data: list[ImageData]


# ---- models -------------------------------------------------------------------------


class Model(_Out):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    # extensions: what the model makes and what one call costs upstream
    kind: str | None = None
    price: float | None = None
    name: str | None = None


class ModelList(_Out):
    object: Literal["list"]
    data: list[Model]


# ---- errors -------------------------------------------------------------------------


class ErrorBody(msgspec.Struct, kw_only=True):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(msgspec.Struct, kw_only=True):
    error: ErrorBody


# ---- legacy completions -------------------------------------------------------------


class CompletionRequest(_In):
    model: ModelId
    # A string, a list of strings, or token ids (refused): checked by the handler, which
    # names the bad element.
    prompt: str | list[Any] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    # Refused when set: the upstreams return neither logprobs nor the prompt, nor fill in.
    echo: bool | None = None
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None
    # Read only to check their types; they travel to the upstream as the client sent them.
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    user: str | None = None


# Fields the proxy consumes itself; everything else in a completion body is passed through.
COMPLETION_OWN_FIELDS = frozenset({"model", "prompt", "stream", "stream_options", "n", "echo", "logprobs",
                                   "suffix", "best_of"})


class CompletionChoice(_Out):
    text: str
    index: int
    logprobs: None
    finish_reason: str | None  # null until the last chunk of a stream


class Completion(_Out):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


# ---- image edits --------------------------------------------------------------------


class ImageReference(_In):
    image_url: str | None = None
    file_id: str | None = None


class ImageEditRequest(_In):
    """The JSON form of /v1/images/edits; the multipart form carries the same fields."""

    prompt: str
    images: list[ImageReference]
    model: ModelId | None = None
    n: int = 1
    size: str | None = None
    quality: str | None = None
    response_format: Literal["url", "b64_json"] | None = None
    output_format: str | None = None
    background: str | None = None
    input_fidelity: str | None = None
    user: str | None = None

