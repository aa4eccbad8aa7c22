"""Keep keys, SAS signatures and control tokens out of everything pytest shows or writes.

A device's connection string is an ordinary string to a test: an assertion that compares one, a
`--showlocals` traceback, a warning or a log line would print the key. This leaf module holds the
registry of live secrets and `redact()`; every layer may use it (the control API, the backends).
plugin/redact.py applies it to pytest's reports, warnings and log lines as they are made.

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
import re
import threading
from urllib.parse import unquote

REDACTED = "<redacted>"
MIN_PARTIAL = 12  # shorter fragments of a 44-character key are not worth hiding (and too common)
_WINDOW = 6
_STRIDE = MIN_PARTIAL - _WINDOW + 1  # so that every MIN_PARTIAL-long piece holds an indexed window

# (trigger, pattern): each pattern runs only on text holding its trigger, so a report without any
# marker costs a few substring searches. Patterns are compiled on first use (_re): pytest imports
# this module for every run, most of which never show a secret.
_MARKED = [(trigger, pattern) for trigger, pattern in (
    ("Key=", r"((?<![A-Za-z])[A-Za-z]*Key=)[^;\s'\"]+"),                  # SharedAccessKey=, AccessKey=
    ("sig=", r"(sig=)[^&;\s'\"]+"),                                       # SAS signature
    ("Bearer", r"(\bBearer\s+)[^\s'\",;]+"),                               # Authorization: Bearer <token>
    ("control_token", r"(control_token[\"']?\s*[:=]\s*[\"']?)[^\s'\",;}]+"),  # the hub's info file
    ("&se=", r"()(?<![A-Za-z0-9+/%_-])[A-Za-z0-9+/%_-]+(?=&se=\d)"),       # a signature cut before &se=
)]
_RUN = rf"[A-Za-z0-9+/_%-]{{{MIN_PARTIAL},}}={{0,2}}"
_SECRET_RUN = rf"[A-Za-z0-9+/_-]{{{MIN_PARTIAL},}}"
_SIG_VALUE = r"sig=([^&;\s'\"]+)"
_compiled: dict[str, "re.Pattern[str]"] = {}


def _re(pattern: str) -> "re.Pattern[str]":
    compiled = _compiled.get(pattern)
    if compiled is None:  # two threads may both compile it once: same result
        compiled = _compiled[pattern] = re.compile(pattern)
    return compiled

_lock = threading.Lock()
# window -> the secret it was cut from, or a tuple of them when secrets share it (rare: 64**6 values)
_index: dict[str, str | tuple[str, ...]] = {}
_counts: dict[str, int] = {}                          # secret -> how many owners hold it live
_device_secrets: dict[str, list[str]] = {}            # device id -> its secrets
_retiring: list[str] = []                             # secrets of removed devices, dropped by release_retired()


def _parts(value) -> list[str]:
    """The secret runs inside a value: a key is one run; of a SAS token only the signature counts
    (its resource URI is a host name and device id, which must stay readable)."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str):
        return []
    pieces = _re(_SIG_VALUE).findall(value) if "sig=" in value else [value]
    out = []
    for piece in pieces:
        for _ in range(2):  # some SDKs encode twice
            if "%" not in piece:
                break
            piece = unquote(piece)
        out.extend(_re(_SECRET_RUN).findall(piece))
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
            text = _re(pattern).sub(_MARKED_REPLACEMENT, text)
    index = _index  # read without the lock: dict lookups are atomic, mutations replace entries whole
    if index:
        text = _re(_RUN).sub(_make_run_sub(index), text)
    return text


def has_secret(text: str) -> bool:
    return bool(text) and redact(text) != text


def remember_keys_of(*connection_strings: str) -> None:
    """Hide the keys of these connection strings from every later output; only the keys: the
    host and device names around them must stay readable."""
    for cs in connection_strings:
        for part in cs.split(";"):
            name, _, value = part.partition("=")
            if name.strip() == "SharedAccessKey" and value:
                remember(value)
