"""structlog setup: one JSON line per event (console rendering on a TTY), secrets scrubbed."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO, cast

import msgspec
import structlog

from proxy.clip import clip
from proxy.redact import redact

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class _CurrentStderr:
    """Writes to whatever sys.stderr is at the time, so test capture and redirection work."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


# msgspec, not json.dumps: a fifth of the cost of every access-log line. Whatever it cannot
# encode is written as its repr, as structlog's own fallback does.
_encode = msgspec.json.Encoder(enc_hook=repr).encode
_CLIP = 512  # characters of one log field; tracebacks are kept whole


def _serialize(event: Any, **_: Any) -> str:
    return _encode(event).decode()


def _clip_values(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Long texts cut: a path, a model id or an upstream's message may be a client's 20 MB."""
    for name, value in event.items():
        if type(value) is str and len(value) > _CLIP and name != "exception":
            event[name] = clip(value, _CLIP)
    return event


def _scrub_rendered(_: Any, __: str, line: str) -> str:
    return redact(line)  # tracebacks and nested values too


class _UvicornLines(logging.Handler):
    """uvicorn's own log records (a request it could not parse, a worker started or stopped) as
    the proxy's lines: JSON like the rest, scrubbed, not a plain-text line among them."""

    def emit(self, record: logging.LogRecord) -> None:
        structlog.get_logger(record.name).log(record.levelno, record.getMessage(), exc_info=record.exc_info)


def setup_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    stream = stream or _CurrentStderr()  # type: ignore[assignment]
    tty = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: Any = structlog.dev.ConsoleRenderer(colors=False) if tty \
        else structlog.processors.JSONRenderer(serializer=_serialize)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _clip_values,
            renderer,
            cast(Any, _scrub_rendered),  # after the renderer: a processor of the rendered line
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.WriteLoggerFactory(file=stream),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    uvicorn = logging.getLogger("uvicorn")  # its servers are configured with no logging of their own
    uvicorn.handlers, uvicorn.propagate = [_UvicornLines()], False
