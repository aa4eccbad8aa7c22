"""Keep keys and SAS signatures out of everything pytest shows or writes.

A device's connection string is an ordinary string to a test: an assertion that compares one, a
`--showlocals` traceback or a log line would print the key. Reports are scrubbed after they are
made, so the terminal, junit XML, pytest-xdist and other plugins only ever see the redacted text.
"""
import threading
from urllib.parse import quote

from ..iothub.auth import redact as _redact_patterns

_MARKERS = ("SharedAccessKey=", "sig=", "SharedAccessSignature ")
_known = set()
_lock = threading.Lock()


def remember(*values) -> None:
    """Secrets to hide wherever they appear, even bare (a key in a local variable, say)."""
    with _lock:
        for v in values:
            if isinstance(v, str) and len(v) >= 16:
                _known.add(v)
                _known.add(quote(v, safe=""))


def has_secret(text: str) -> bool:
    return any(m in text for m in _MARKERS) or any(k in text for k in _known)


def redact(text: str) -> str:
    text = _redact_patterns(text)
    for k in sorted(_known, key=len, reverse=True):
        text = text.replace(k, "<redacted>")
    return text


def scrub_report(report) -> None:
    longrepr = getattr(report, "longrepr", None)
    if longrepr is not None:
        text = str(longrepr)
        if has_secret(text):
            if isinstance(longrepr, tuple) and len(longrepr) == 3:  # skip reports: (path, line, reason)
                report.longrepr = (longrepr[0], longrepr[1], redact(longrepr[2]))
            else:
                report.longrepr = redact(text)
    sections = getattr(report, "sections", None)
    if sections:
        report.sections = [(title, redact(content) if has_secret(content) else content)
                           for title, content in sections]
    props = getattr(report, "user_properties", None)
    if props:
        report.user_properties = [(k, redact(v) if isinstance(v, str) and has_secret(v) else v)
                                  for k, v in props]


def remember_connection_string_keys(settings) -> None:
    for name in ("connection_string", "eventhub_connection_string"):
        cs = getattr(settings, name, None)
        if cs:
            for part in cs.split(";"):
                key, _, value = part.partition("=")
                if key.strip() in ("SharedAccessKey", "SharedAccessSignature"):
                    remember(value)
