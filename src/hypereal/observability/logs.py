"""Structured logs (structlog): JSON lines, or plain text when the output is a terminal.

Every line written while a request or a job is being served carries its context: the request
id, the API key and account, the model and the job id (:func:`annotate` adds to it). Standard
library loggers (uvicorn's, the app's ``logging.getLogger``) go through the same formatter,
so the whole process writes one format.
"""

from __future__ import annotations

import logging
import os
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Protocol, TextIO

import orjson
import structlog
from structlog.typing import EventDict, WrappedLogger

# The current request's (or job's) log context: a dict the middleware creates per request.
LOG_CONTEXT: ContextVar[dict[str, Any] | None] = ContextVar("hypereal_log_context", default=None)


class Caller(Protocol):
    """What the logs read of the request's caller (the domain's ``Principal``)."""

    @property
    def key_id(self) -> str: ...

    @property
    def account_id(self) -> str: ...


# The current request's caller, set by the auth middleware with the domain's own.
LOG_CALLER: ContextVar[Caller | None] = ContextVar("hypereal_log_caller", default=None)

ACCESS_LOGGER = "hypereal.access"
TASKIQ_RECEIVER_LOGGER = "taskiq.receiver.receiver"


def annotate(**fields: Any) -> None:
    """Add ``fields`` (model=..., job_id=...) to the current request's log context."""
    context = LOG_CONTEXT.get()
    if context is not None:
        context.update(fields)


def _merge_context(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    context = LOG_CONTEXT.get()
    if context:
        for name, value in context.items():
            event.setdefault(name, value)
    caller = LOG_CALLER.get()
    if caller is not None:
        event.setdefault("key_id", caller.key_id)
        event.setdefault("account_id", caller.account_id)
    return event


def _orjson(value: Any, **_: Any) -> str:
    return orjson.dumps(value, default=str).decode()


class AccessWriter:
    """The access line as JSON without the logging machinery: the same fields the structlog
    pipeline writes for a ``hypereal.access`` record (``event``, ``level``, ``logger``,
    ``timestamp``, the request's context and the line's own fields), rendered by orjson and
    written to the stream at once. The logging path cost a quarter of the CPU of a cheap
    request; this costs a few microseconds."""

    def __init__(self, stream: TextIO, pid: int | None = None) -> None:
        self.stream = stream
        self.pid = pid

    def write(self, fields: dict[str, Any], context: dict[str, Any]) -> None:
        line: dict[str, Any] = {**context, **fields}
        if self.pid is not None:
            line["pid"] = self.pid
        line["event"] = "request"
        line["level"] = "info"
        line["logger"] = ACCESS_LOGGER
        line["timestamp"] = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        self.stream.write(orjson.dumps(line, default=str).decode() + "\n")
        self.stream.flush()


# Set by configure_logging when the lines are JSON; None: access lines go through logging.
_access_writer: AccessWriter | None = None


def access_writer() -> AccessWriter | None:
    return _access_writer


def configure_logging(
    *,
    level: str = "INFO",
    json: bool | None = None,
    stream: TextIO | None = None,
    access: bool = True,
    with_pid: bool = False,
) -> None:
    """Route every log line through structlog to ``stream`` (stderr): JSON unless ``json`` is
    False or (when None) the stream is a terminal. The access log (one line per request) is
    ``hypereal.access``. ``with_pid``: every line says which process wrote it (``pid``), for
    the processes of ``hypereal serve --processes N`` writing to one stream."""
    global _access_writer
    stream = stream or sys.stderr
    terminal = stream.isatty()
    as_json = (not terminal) if json is None else json
    pid = os.getpid() if with_pid else None
    _access_writer = AccessWriter(stream, pid) if as_json else None
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_orjson)
        if as_json
        else structlog.dev.ConsoleRenderer(colors=terminal)
    )
    shared: list[Any] = [
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        _merge_context,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if pid is not None:
        shared.append(_add_pid(pid))
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder(), _drop_color_message],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info if as_json else _keep,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.NOTSET if access else logging.WARNING)
    # taskiq's receiver writes "Executing task hypereal.run_job with ID: <its message id>" at
    # INFO for every queue message: a line per doorbell that names no job (the job's own logs
    # do), and in a worker the costliest part of reading a message. Kept at DEBUG.
    verbose = logging.getLevelName(level.upper()) == logging.DEBUG
    logging.getLogger(TASKIQ_RECEIVER_LOGGER).setLevel(
        logging.NOTSET if verbose else logging.WARNING
    )
    # uvicorn's own handlers would print a second, differently formatted line.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
        logger.setLevel(logging.NOTSET)  # the root's level (uvicorn.run sets its own after)


def _add_pid(pid: int) -> Any:
    def add(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
        event["pid"] = pid
        return event

    return add


def _drop_color_message(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    """uvicorn passes a copy of its message with terminal colour codes as an extra."""
    event.pop("color_message", None)
    return event


def _keep(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    return event
