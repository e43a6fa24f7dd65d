"""The proxy's own OpenAPI document: what each handler takes and answers.

Handlers read their raw bodies themselves (speed, and 400s that name the field), so
Litestar cannot see a request type in their signatures. `documented()` declares it: a
dependency whose `data` parameter carries the type. Litestar documents the body of every
dependency a handler declares, but runs only those the handler asks for, and no handler
asks for this one: the body is never parsed twice. The answers are declared as
ResponseSpecs; stream and multipart variants are added by a small Operation subclass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from litestar.di import Provide
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIResponse, Operation, Schema
from litestar.openapi.spec.enums import OpenAPIFormat, OpenAPIType

from proxy.openai.types import ErrorResponse

# The statuses any authenticated call may answer, all in OpenAI's error shape.
ERROR_STATUSES = {
    400: "Invalid request: the message names the field (`param`).",
    401: "Missing or unknown API key.",
    403: "This client may not use the model.",
    404: "Unknown model, route or object.",
    409: "This Idempotency-Key was used with another body.",
    413: "The request body is larger than the proxy accepts.",
    429: "Rate limit, or balance/budget short (`insufficient_quota`).",
    500: "The proxy failed.",
    502: "The upstream failed or answered garbage.",
    503: "No upstream key can serve.",
    504: "The upstream task did not finish in time.",
}

_BODY_DEPENDENCY = "openapi_request_body"


def _body_provider(kind: type) -> Provide:
    def request_body(data: Any) -> None:  # never called: see the module docstring
        return None

    request_body.__annotations__ = {"data": kind, "return": None}
    return Provide(request_body, sync_to_thread=False)


def _stream_note(what: str) -> OpenAPIMediaType:
    return OpenAPIMediaType(schema=Schema(type=OpenAPIType.STRING, description=what))


def _binary() -> Schema:
    return Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY)


def _operation(stream: str | None, multipart: Schema | None) -> type[Operation]:
    @dataclass
    class DocumentedOperation(Operation):
        def __post_init__(self) -> None:
            if stream is not None and self.responses:
                answer = self.responses.get("200")
                if isinstance(answer, OpenAPIResponse) and answer.content is not None:
                    answer.content["text/event-stream"] = _stream_note(stream)
            if multipart is not None and self.request_body is not None:
                content = getattr(self.request_body, "content", None)
                if isinstance(content, dict):
                    content["multipart/form-data"] = OpenAPIMediaType(schema=multipart)

    return DocumentedOperation


def documented(answer: type | None, *, body: type | None = None, stream: str | None = None,
               multipart: Schema | None = None, media_type: str = "application/json",
               description: str = "OK", errors: tuple[int, ...] = tuple(ERROR_STATUSES)) -> dict[str, Any]:
    """Handler options (`@post(..., **documented(...))`) declaring the request body type, the
    200 answer, its text/event-stream variant (`stream`: what the events are), a multipart
    variant of the body, and the error answers."""
    ok = ResponseSpec(data_container=answer, generate_examples=False, description=description,
                      media_type=media_type)
    responses: dict[int, ResponseSpec] = {200: ok}
    # 400 always: Litestar answers one for any path or body it cannot read, in our error shape.
    for status in sorted({400, *errors}):
        responses[status] = ResponseSpec(data_container=ErrorResponse, generate_examples=False,
                                         description=ERROR_STATUSES[status])
    options: dict[str, Any] = {"responses": responses}
    if body is not None:
        options["dependencies"] = {_BODY_DEPENDENCY: _body_provider(body)}
    if stream is not None or multipart is not None:
        options["operation_class"] = _operation(stream, multipart)
    return options


def form_schema(fields: dict[str, str | list[str]], required: list[str]) -> Schema:
    """A multipart form: each field "string", "integer", "binary", "binary[]" or a list of allowed strings."""
    def one(kind: str | list[str]) -> Schema:
        if isinstance(kind, list):
            return Schema(type=OpenAPIType.STRING, enum=list(kind))
        if kind == "binary[]":
            return Schema(type=OpenAPIType.ARRAY, items=_binary())
        if kind == "binary":
            return _binary()
        return Schema(type=OpenAPIType(kind))

    return Schema(type=OpenAPIType.OBJECT, properties={k: one(v) for k, v in fields.items()}, required=required)
