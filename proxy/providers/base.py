"""What every upstream dialect declares, and the normalised values the rest of the proxy trades in.

A dialect knows one upstream's URLs, bodies and error dialect, and nothing else: it builds
each request (`*_request`) and parses each answer (`check`, then `parse_*`), as pure
functions of their inputs. Sending, pipelining, timing and waiting are the shared engine's
(proxy/providers/engine.py); choosing keys is the pool's; OpenAI's shapes are the edge's.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, NamedTuple

import msgspec

from proxy.errors import Kind, ProxyError

ModelKind = Literal["chat", "image", "video", "audio", "other"]
TaskStatus = Literal["pending", "running", "succeeded", "failed"]


class ModelInfo(msgspec.Struct, frozen=True, kw_only=True):
    id: str  # the upstream's own id (slug, service_code)
    kind: ModelKind
    price: float | None = None  # what one call costs, in the upstream's units
    name: str | None = None
    vip_discount: float | None = None


class ChatCall(msgspec.Struct, kw_only=True):
    model: str
    messages: list[dict[str, Any]]
    params: dict[str, Any]  # sampling and other fields, passed through as given


class ChatAnswer(msgspec.Struct, kw_only=True):
    content: str | None
    tool_calls: list[dict[str, Any]] | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class ImageCall(msgspec.Struct, kw_only=True):
    model: str
    prompt: str
    kind: ModelKind = "image"
    size: str | None = None  # OpenAI's "WxH", translated where the upstream has one
    references: list[str] = []  # reference image URLs
    extra: dict[str, Any] = {}  # upstream-specific parameters from the client or an alias


class TaskState(msgspec.Struct, kw_only=True):
    status: TaskStatus
    task_id: str | None = None  # the upstream's id; None when the answer came at once
    urls: list[str] = []
    media_type: str | None = None
    progress: float | None = None
    reason: str | None = None
    cost: float | None = None  # what the upstream says it charged
    balance: float | None = None  # the key's balance after the call, when the upstream says

    @property
    def final(self) -> bool:
        return self.status in ("succeeded", "failed")


class KeyInfo(msgspec.Struct, kw_only=True):
    credits: float | None = None
    vip_level: int | None = None


class UpstreamCall(NamedTuple):
    """One request a dialect asks for; the key's headers are added by `Dialect.auth`."""

    method: str
    path: str  # relative to the provider's base URL
    params: dict[str, str] | None = None  # the query string
    json: Any = None  # the body, sent as JSON


class TaskList(NamedTuple):
    """One page of a key's tasks (an upstream that lists them): what each says, by its id."""

    tasks: list[TaskState]  # a finished one may have no URLs: its result is read with a poll
    full: bool  # the page was full: older tasks may be on the next


class Answer(NamedTuple):
    """An upstream's answer, as the dialect's `check` reads it."""

    status: int
    body: Any  # decoded JSON, or None when the body was not JSON
    retry_after: float | None


class Dialect:
    """One upstream's API. Subclasses override what their upstream has; the defaults are
    "no chat", "no balance", "no known rate limit", "images answered at once"."""

    has_balance: ClassVar[bool] = False  # whether balance_request asks the upstream anything
    models_need_key: ClassVar[bool] = True  # the model list is read with a key

    def __init__(self, name: str) -> None:
        self.name = name  # the config table's name: in messages, and the model prefix

    # ---- the key and the error dialect ----------------------------------------------

    def auth(self, key: str) -> dict[str, str]:
        return {"authorization": f"Bearer {key}"}

    def check(self, answer: Answer) -> Any:
        """The answer's payload, or the ProxyError its error dialect says."""
        raise NotImplementedError

    # ---- what a dialect declares ----------------------------------------------------

    def models_request(self) -> UpstreamCall:
        raise NotImplementedError

    def parse_models(self, payload: Any) -> list[ModelInfo]:
        raise NotImplementedError

    def chat_request(self, call: ChatCall) -> UpstreamCall:
        raise ProxyError(Kind.BAD_REQUEST, f"{self.name} offers no chat models", param="model")

    def parse_chat(self, payload: Any) -> ChatAnswer:
        raise NotImplementedError

    def submit_request(self, call: ImageCall) -> UpstreamCall:
        raise ProxyError(Kind.BAD_REQUEST, f"{self.name} offers no image models", param="model")

    def parse_submit(self, payload: Any) -> TaskState:
        raise NotImplementedError

    def poll_request(self, task_id: str) -> UpstreamCall:
        raise ProxyError(Kind.UPSTREAM_UNAVAILABLE, f"{self.name} has no tasks to poll")

    def parse_poll(self, task_id: str, payload: Any) -> TaskState:
        raise NotImplementedError

    def list_request(self, page: int) -> UpstreamCall | None:
        """A page (from 1) of the key's tasks, newest first, for one call to poll many; None:
        the upstream has no such list, every task is polled on its own."""
        return None

    def parse_list(self, payload: Any) -> TaskList | None:
        """None when the answer is not a list this dialect can read."""
        return None

    def balance_request(self) -> UpstreamCall | None:
        return None

    def parse_balance(self, payload: Any) -> KeyInfo | None:
        return None

    def key_limit(self, vip_level: int | None) -> int | None:
        """Calls per rate window the upstream allows one key; None: no known limit."""
        return None


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: rare upstream, treat as unknown


def as_float(value: Any) -> float | None:
    """Prices and progress arrive as numbers, numeric strings, "40%" or ""."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        text = value.strip().rstrip("%").strip()
        try:
            return float(text) if text else None
        except ValueError:
            return None
    return None


def as_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def as_text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def normalise_phrase(text: str) -> str:
    """Lower case, any run of spaces, dashes or underscores as one space: for loose matching."""
    return " ".join(text.lower().replace("_", " ").replace("-", " ").split())


def first_match(phrase: str, table: list[tuple[tuple[str, ...], Kind]]) -> Kind | None:
    """The kind of the first row one of whose needles is in `phrase` (normalised)."""
    for needles, kind in table:
        if any(needle in phrase for needle in needles):
            return kind
    return None


def unreadable(name: str, answer: Answer) -> ProxyError:
    return ProxyError(Kind.UPSTREAM_UNAVAILABLE,
                      f"{name} upstream answered HTTP {answer.status} with an unreadable body",
                      retry_after=answer.retry_after)
