"""The proxy's error kinds and their one mapping to OpenAI's status, type and code.

Providers raise `ProxyError` with an upstream kind; the pool reacts to the kind; the
edge turns whatever escapes into OpenAI's `{"error": {message, type, param, code}}`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Kind(enum.Enum):
    # upstream kinds: what a provider can prove about one call
    AUTH = "auth"  # the upstream refused the key
    BALANCE = "balance"  # the key's balance or credits are short
    RATE_LIMITED = "rate_limited"
    MODEL_NOT_FOUND = "model_not_found"
    BAD_REQUEST = "bad_request"
    CONTENT_POLICY = "content_policy"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    TASK_FAILED = "task_failed"
    TASK_TIMEOUT = "task_timeout"
    # edge kinds: decided by the proxy itself
    INVALID_API_KEY = "invalid_api_key"
    MODEL_NOT_ALLOWED = "model_not_allowed"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    CONFLICT = "conflict"
    RESTARTING = "restarting"
    NO_UPSTREAM_KEY = "no_upstream_key"
    INTERNAL = "internal"


@dataclass(frozen=True, slots=True)
class Shape:
    status: int
    type: str
    code: str | None
    retry: bool | None = None  # sent as x-should-retry when not None


# The one table from kind to OpenAI's answer. An upstream AUTH that reaches the edge
# means no key was usable, hence no_upstream_key.
SHAPES: dict[Kind, Shape] = {
    Kind.AUTH: Shape(503, "server_error", "no_upstream_key"),
    Kind.BALANCE: Shape(429, "insufficient_quota", "insufficient_quota", retry=False),
    Kind.RATE_LIMITED: Shape(429, "requests", "rate_limit_exceeded"),
    Kind.MODEL_NOT_FOUND: Shape(404, "invalid_request_error", "model_not_found"),
    Kind.BAD_REQUEST: Shape(400, "invalid_request_error", None),
    Kind.CONTENT_POLICY: Shape(400, "invalid_request_error", "content_policy_violation"),
    Kind.UPSTREAM_UNAVAILABLE: Shape(502, "server_error", "upstream_error"),
    Kind.TASK_FAILED: Shape(502, "server_error", "upstream_task_failed", retry=False),
    Kind.TASK_TIMEOUT: Shape(504, "server_error", "upstream_timeout", retry=False),
    Kind.INVALID_API_KEY: Shape(401, "invalid_request_error", "invalid_api_key"),
    Kind.MODEL_NOT_ALLOWED: Shape(403, "invalid_request_error", "model_not_allowed"),
    Kind.NOT_FOUND: Shape(404, "invalid_request_error", "not_found"),
    Kind.METHOD_NOT_ALLOWED: Shape(405, "invalid_request_error", "method_not_allowed"),
    Kind.PAYLOAD_TOO_LARGE: Shape(413, "invalid_request_error", "request_too_large"),
    Kind.UNSUPPORTED_MEDIA_TYPE: Shape(415, "invalid_request_error", "unsupported_media_type"),
    Kind.CONFLICT: Shape(409, "invalid_request_error", "idempotency_key_reused"),
    Kind.RESTARTING: Shape(503, "server_error", "proxy_restarting"),
    Kind.NO_UPSTREAM_KEY: Shape(503, "server_error", "no_upstream_key"),
    Kind.INTERNAL: Shape(500, "server_error", "internal_error"),
}

# Kinds that prove the upstream did not take the job: safe to try the same call on another key.
NOT_ACCEPTED = frozenset({Kind.AUTH, Kind.BALANCE, Kind.RATE_LIMITED})


class ProxyError(Exception):
    """One failure, with everything the edge needs to answer it in OpenAI's shape."""

    def __init__(
        self,
        kind: Kind,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        task_ids: tuple[str, ...] = (),
        delivered: bool = True,
        paid: bool = False,
        unfinished: bool = False,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.param = param
        self.code = code  # overrides the table's code where a more specific one is known
        self.retry_after = retry_after
        self.task_ids = task_ids
        # False when the request provably never reached the upstream (connection refused):
        # then, like NOT_ACCEPTED kinds, it may go to another key.
        self.delivered = delivered
        # True when the upstream may have charged for the call that failed: a client's retry
        # would pay again, so the answer says x-should-retry: false.
        self.paid = paid
        # True when the tasks it names still run (a request's timeout): a repeat answers from them later.
        self.unfinished = unfinished

    @property
    def retryable_elsewhere(self) -> bool:
        return self.kind in NOT_ACCEPTED or not self.delivered

    @property
    def should_retry(self) -> bool | None:
        """What x-should-retry says (None: the header is not sent)."""
        return False if self.reflects_upstream_work else self.shape.retry

    @property
    def reflects_upstream_work(self) -> bool:
        """The answer tells of upstream work (a paid call, a task): worth keeping for a repeat."""
        return self.paid or bool(self.task_ids)

    @property
    def shape(self) -> Shape:
        return SHAPES[self.kind]

    def __repr__(self) -> str:
        return f"ProxyError({self.kind.value}, {self.message!r})"


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ProxyError:
    return ProxyError(Kind.BAD_REQUEST, message, param=param, code=code)
