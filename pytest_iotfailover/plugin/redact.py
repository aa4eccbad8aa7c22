"""The pytest side of redaction: reports, warnings, log handlers and junit properties are scrubbed
as pytest makes them, so the terminal, junit XML, pytest-xdist and other plugins only ever see the
redacted text. The rules and the registry of live secrets are in the leaf module redaction.py."""
from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from ..redaction import redact, remember

__all__ = ["RedactingFormatter", "redact", "redact_handlers", "remember_connection_string_keys",
           "scrub_report", "scrub_suite_properties", "scrub_warning"]


def _redact_value(value: Any) -> Any:
    """A user property as junit XML will write it (str(value)), redacted when it holds a secret."""
    if isinstance(value, str):
        return redact(value)
    shown = str(value)
    cleaned = redact(shown)
    return value if cleaned == shown else cleaned


def scrub_report(report: Any) -> None:
    longrepr = getattr(report, "longrepr", None)
    if longrepr is not None:
        if isinstance(longrepr, tuple) and len(longrepr) == 3:  # skip reports: (path, line, reason)
            reason = redact(str(longrepr[2]))
            if reason != longrepr[2]:
                report.longrepr = (longrepr[0], longrepr[1], reason)
        else:
            text = str(longrepr)
            cleaned = redact(text)
            if cleaned != text:
                report.longrepr = cleaned
    xfail_reason = getattr(report, "wasxfail", None)
    if isinstance(xfail_reason, str) and xfail_reason:  # pytest.xfail(reason), shown by -rx
        report.wasxfail = redact(xfail_reason)
    sections = getattr(report, "sections", None)
    if sections:
        report.sections = [(title, redact(content)) for title, content in sections]
    props = getattr(report, "user_properties", None)
    if props:
        report.user_properties = [(redact(str(k)) if not isinstance(k, str) else redact(k), _redact_value(v))
                                  for k, v in props]


def scrub_warning(warning_message: Any) -> None:
    """Redact a recorded warning in place, before the warnings summary or pytest-xdist sees it."""
    line = getattr(warning_message, "line", None)
    if line:
        warning_message.line = redact(line)
    message = warning_message.message
    text = str(message)
    cleaned = redact(text)
    if cleaned == text:
        return
    if isinstance(message, Warning):
        message.args = (cleaned,)
        if str(message) != cleaned:  # its __str__ ignores args: replace it
            warning_message.message = UserWarning(cleaned)
    else:
        warning_message.message = cleaned


def scrub_suite_properties(config: Any) -> None:
    """record_testsuite_property values go straight to junit XML at the end, past every report."""
    try:
        from _pytest.junitxml import xml_key
    except ImportError:  # pragma: no cover - a pytest without it has no such properties
        return
    xml = config.stash.get(xml_key, None)
    if xml is not None and getattr(xml, "global_properties", None):
        xml.global_properties = [(name, redact(str(value))) for name, value in xml.global_properties]


class RedactingFormatter(logging.Formatter):
    """Wraps a handler's formatter so that the formatted line is redacted. The record itself is left
    alone: caplog and other handlers see what the test logged."""

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return redact(self.inner.format(record))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def redact_handlers(handlers: Iterable[logging.Handler | None]) -> None:
    for handler in handlers:
        if handler is None or isinstance(handler.formatter, RedactingFormatter):
            continue
        handler.setFormatter(RedactingFormatter(handler.formatter or logging.Formatter()))


def remember_connection_string_keys(settings: Any) -> None:
    """The keys of the connection strings in the settings stay hidden for the whole run."""
    for name in ("connection_string", "eventhub_connection_string"):
        cs = getattr(settings, name, None)
        if cs:
            for part in cs.split(";"):
                key, _, value = part.partition("=")
                if key.strip() in ("SharedAccessKey", "SharedAccessSignature"):
                    remember(value)
