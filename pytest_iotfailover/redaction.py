"""Keep keys, SAS signatures and control tokens out of everything pytest shows or writes.

A device's connection string is an ordinary string to a test: an assertion that compares one, a
`--showlocals` traceback, a warning or a log line would print the key. Reports, warnings and the
live/file log lines are scrubbed as they are made, so the terminal, junit XML, pytest-xdist and
other plugins only ever see the redacted text.

Two rules, each a fixed number of regex passes over the text, whatever the number of keys:

* marked values: whatever follows `...Key=`, `sig=`, `Bearer ` or `control_token` is hidden, and so
  is the base64 run just before `&se=<digits>` (the signature of a SAS token whose head was cut off);
  a pattern runs only when its literal trigger is in the text;
* live secrets: a run of base64/URL-safe characters holding MIN_PARTIAL or more consecutive
  characters of a secret the plugin knows about is hidden whole. That catches bare keys, the
  truncated reprs pytest prints in assertion messages (`'HostName=...;SharedAcc...Zk3N='`) and
  percent-encoded copies.

Live secrets are found through an index of fixed-length windows: every secret contributes the
windows that start at multiples of _STRIDE; any MIN_PARTIAL characters of it contain one of those
windows whole, so looking up each window of a run in a dict finds every such leak. The cost is one
lookup per character of the runs in the text, independent of how many secrets are live. Device keys
are live while their device exists and until the next test starts (the removing test's teardown
report and warnings are made after its fixtures are gone); keys from the command line and control
tokens stay for the whole run.
"""
import logging
import re
import threading
from typing import Dict, Iterable, List, Optional, Tuple, Union
from urllib.parse import unquote

REDACTED = "<redacted>"
MIN_PARTIAL = 12  # shorter fragments of a 44-character key are not worth hiding (and too common)
_WINDOW = 6
_STRIDE = MIN_PARTIAL - _WINDOW + 1  # so that every MIN_PARTIAL-long piece holds an indexed window

# (trigger, pattern): each pattern runs only on text holding its trigger, so a report without any
# marker costs a few substring searches
_MARKED = [(trigger, re.compile(pattern)) for trigger, pattern in (
    ("Key=", r"((?<![A-Za-z])[A-Za-z]*Key=)[^;\s'\"]+"),                  # SharedAccessKey=, AccessKey=
    ("sig=", r"(sig=)[^&;\s'\"]+"),                                       # SAS signature
    ("Bearer", r"(\bBearer\s+)[^\s'\",;]+"),                               # Authorization: Bearer <token>
    ("control_token", r"(control_token[\"']?\s*[:=]\s*[\"']?)[^\s'\",;}]+"),  # the hub's info file
    ("&se=", r"()(?<![A-Za-z0-9+/%_-])[A-Za-z0-9+/%_-]+(?=&se=\d)"),       # a signature cut before &se=
)]
_RUN = re.compile(r"[A-Za-z0-9+/_%%-]{%d,}={0,2}" % MIN_PARTIAL)
_SECRET_RUN = re.compile(r"[A-Za-z0-9+/_-]{%d,}" % MIN_PARTIAL)
_SIG_VALUE = re.compile(r"sig=([^&;\s'\"]+)")

_lock = threading.Lock()
# window -> the secret it was cut from, or a tuple of them when secrets share it (rare: 64**6 values)
_index: Dict[str, Union[str, Tuple[str, ...]]] = {}
_counts: Dict[str, int] = {}                          # secret -> how many owners hold it live
_device_secrets: Dict[str, List[str]] = {}            # device id -> its secrets
_retiring: List[str] = []                             # secrets of removed devices, dropped by release_retired()


def _parts(value) -> List[str]:
    """The secret runs inside a value: a key is one run; of a SAS token only the signature counts
    (its resource URI is a host name and device id, which must stay readable)."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str):
        return []
    pieces = _SIG_VALUE.findall(value) if "sig=" in value else [value]
    out = []
    for piece in pieces:
        for _ in range(2):  # some SDKs encode twice
            if "%" not in piece:
                break
            piece = unquote(piece)
        out.extend(_SECRET_RUN.findall(piece))
    return out


def _add(secret: str) -> None:
    n = _counts.get(secret, 0)
    _counts[secret] = n + 1
    if n:
        return
    for off in range(0, len(secret) - _WINDOW + 1, _STRIDE):
        w = secret[off:off + _WINDOW]
        held = _index.get(w)
        if held is None:
            _index[w] = secret
        elif held != secret and (isinstance(held, str) or secret not in held):
            _index[w] = (held, secret) if isinstance(held, str) else held + (secret,)


def _drop(secret: str) -> None:
    n = _counts.get(secret, 0)
    if n > 1:
        _counts[secret] = n - 1
        return
    if not n:
        return
    del _counts[secret]
    for off in range(0, len(secret) - _WINDOW + 1, _STRIDE):
        w = secret[off:off + _WINDOW]
        held = _index.get(w)
        if held is None or held == secret:
            _index.pop(w, None)
        elif not isinstance(held, str):
            kept = tuple(h for h in held if h != secret)
            _index[w] = kept[0] if len(kept) == 1 else kept


def remember(*values) -> None:
    """Secrets to hide for the rest of the process, even bare (a key in a local variable, say)."""
    with _lock:
        for v in values:
            for part in _parts(v):
                _add(part)


def remember_device(device_id: str, *values) -> None:
    """A device's keys: hidden while the device exists, see forget_device()."""
    parts = [p for v in values for p in _parts(v)]
    with _lock:
        old = _device_secrets.pop(device_id, None)
        _device_secrets[device_id] = parts
        for part in parts:
            _add(part)
        if old:
            _retiring.extend(old)


def forget_device(device_id: str) -> None:
    """The device is gone. Its keys stay hidden until release_retired(): the reports, warnings
    and captured output of the test that removed it are made after its fixtures are torn down."""
    with _lock:
        _retiring.extend(_device_secrets.pop(device_id, ()))


def release_retired() -> None:
    with _lock:
        retiring = _retiring[:]
        del _retiring[:]
        for secret in retiring:
            _drop(secret)


def live_count() -> int:
    return len(_counts)


_MARKED_REPLACEMENT = r"\1" + REDACTED


def _holds_live_secret(run: str, index) -> bool:
    for _ in range(2):
        if "%" not in run:
            break
        run = unquote(run)
    n = len(run)
    windows = [run[p:p + _WINDOW] for p in range(n - _WINDOW + 1)]
    if index.keys().isdisjoint(windows):  # the common case, decided in C
        return False
    get = index.get
    for p, window in enumerate(windows):
        held = get(window)
        if held is None:
            continue
        for secret in (held,) if isinstance(held, str) else held:
            off = secret.find(window)
            while off >= 0:
                # the window matched; measure the whole stretch the run shares with the secret here
                lo, so = p, off
                while lo > 0 and so > 0 and run[lo - 1] == secret[so - 1]:
                    lo -= 1
                    so -= 1
                hi, se = p + _WINDOW, off + _WINDOW
                while hi < n and se < len(secret) and run[hi] == secret[se]:
                    hi += 1
                    se += 1
                if hi - lo >= MIN_PARTIAL:
                    return True
                off = secret.find(window, off + 1)
    return False


def _make_run_sub(index):
    def sub(m) -> str:
        return REDACTED if _holds_live_secret(m.group(), index) else m.group()
    return sub


def redact(text: str) -> str:
    """`text` with every marked value and every run holding a piece of a live secret replaced."""
    if not text:
        return text
    for trigger, pattern in _MARKED:
        if trigger in text:
            text = pattern.sub(_MARKED_REPLACEMENT, text)
    index = _index  # read without the lock: dict lookups are atomic, mutations replace entries whole
    if index:
        text = _RUN.sub(_make_run_sub(index), text)
    return text


def has_secret(text: str) -> bool:
    return bool(text) and redact(text) != text


def _redact_value(value):
    """A user property as junit XML will write it (str(value)), redacted when it holds a secret."""
    if isinstance(value, str):
        return redact(value)
    shown = str(value)
    cleaned = redact(shown)
    return value if cleaned == shown else cleaned


def scrub_report(report) -> None:
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
    reason = getattr(report, "wasxfail", None)
    if isinstance(reason, str) and reason:  # pytest.xfail(reason), shown by -rx
        report.wasxfail = redact(reason)
    sections = getattr(report, "sections", None)
    if sections:
        report.sections = [(title, redact(content)) for title, content in sections]
    props = getattr(report, "user_properties", None)
    if props:
        report.user_properties = [(redact(str(k)) if not isinstance(k, str) else redact(k), _redact_value(v))
                                  for k, v in props]


def scrub_warning(warning_message) -> None:
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


class RedactingFormatter(logging.Formatter):
    """Wraps a handler's formatter so that the formatted line is redacted. The record itself is left
    alone: caplog and other handlers see what the test logged."""

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return redact(self.inner.format(record))

    def __getattr__(self, name):
        return getattr(self.inner, name)


def redact_handlers(handlers: Iterable[Optional[logging.Handler]]) -> None:
    for handler in handlers:
        if handler is None or isinstance(handler.formatter, RedactingFormatter):
            continue
        handler.setFormatter(RedactingFormatter(handler.formatter or logging.Formatter()))


def remember_connection_string_keys(settings) -> None:
    for name in ("connection_string", "eventhub_connection_string"):
        cs = getattr(settings, name, None)
        if cs:
            for part in cs.split(";"):
                key, _, value = part.partition("=")
                if key.strip() in ("SharedAccessKey", "SharedAccessSignature"):
                    remember(value)
