"""IoT Hub's documented limits as pure validators.

Every validator returns an `IotHubError` (IoT Hub's numeric error code, its name and a message that
says what is wrong) or None when the input is within the limit. Nothing here raises on bad input,
touches the network, reads a clock or keeps state: callers pass `now` where time matters.

Sources, cited by tag in the comments below (all MicrosoftDocs/azure-docs unless noted):

- D-QT    `articles/iot-hub/iot-hub-devguide-quotas-throttling.md` (ms.date 2025-05-21), "Other limits"
- D-TWIN  `articles/iot-hub/iot-hub-devguide-device-twins.md` (ms.date 2024-02-22), "Tags and properties
          format" and "Device twin size"
- D-DM    `articles/iot-hub/iot-hub-devguide-direct-methods.md`; timeouts from the C# service SDK
          reference (`DigitalTwinInvokeCommandRequestOptions.ResponseTimeoutInSeconds`: default 30,
          min 5, max 300; `MethodRequest.ConnectionTimeout`: default 0, max 300)
- D-C2D   `articles/iot-hub/iot-hub-devguide-messages-c2d.md` (ms.date 2026-02-11)
- D-MSG   `articles/iot-hub/iot-hub-devguide-messages-construct.md` ("Message size", message-id format)
- D-ERR   `articles/iot-hub/troubleshoot-error-codes.md` (ms.date 2026-01-06): the error code table
- D-MQTT  `articles/iot/iot-mqtt-connect-to-iot-hub.md` (user name, property bag encoding)
- D-SAS   `articles/iot-hub/authenticate-authorize-sas.md` (policies, DeviceConnect, `skn`)
- CS-ERR  Azure/azure-iot-sdk-csharp `iothub/service/src/Exceptions/IotHubServiceErrorCode.cs`
- Issues: Azure/azure-iot-sdk-c #869 and #1695, Azure/azure-iot-sdk-java PR #743, amenzhinsky/iothub #54

"KB" is read as 1024 bytes throughout (assumption: the documents do not say; the Python SDK's own
D2C check uses 262144 bytes for 256 KB, `azure.iot.device.constant.TELEMETRY_MESSAGE_SIZE_LIMIT`).
"""
from __future__ import annotations

import json
import math
import re
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from .auth import Username

__all__ = [
    "C2D_ACK_VALUES",
    "C2D_DEFAULT_TTL",
    "C2D_MAX_MESSAGE_BYTES",
    "C2D_MAX_TTL",
    "C2D_MIN_DEFAULT_TTL",
    "C2D_QUEUE_LIMIT",
    "D2C_MAX_MESSAGE_BYTES",
    "DEFAULT_POLICY_PERMISSIONS",
    "DEVICE_CONNECT",
    "ERROR_NAMES",
    "MESSAGE_ID_MAX_CHARS",
    "METHOD_CONNECT_TIMEOUT_DEFAULT",
    "METHOD_CONNECT_TIMEOUT_MAX",
    "METHOD_MAX_PAYLOAD_BYTES",
    "METHOD_RESPONSE_TIMEOUT_DEFAULT",
    "METHOD_RESPONSE_TIMEOUT_MAX",
    "METHOD_RESPONSE_TIMEOUT_MIN",
    "PERMISSIONS",
    "TWIN_INT_MAX",
    "TWIN_INT_MIN",
    "TWIN_MAX_DEPTH",
    "TWIN_MAX_KEY_BYTES",
    "TWIN_MAX_STRING_BYTES",
    "TWIN_READ_ONLY_KEYS",
    "TWIN_SECTION_MAX_BYTES",
    "AccessPolicy",
    "IotHubError",
    "c2d_expired",
    "c2d_expiry",
    "default_policies",
    "iothub_error",
    "json_nesting_depth",
    "loads_json",
    "message_size",
    "parse_device_username",
    "plain_bag",
    "property_bag_breaks_connection",
    "property_bag_problem",
    "sas_keys_to_try",
    "twin_section_size",
    "validate_c2d_ack",
    "validate_c2d_default_ttl",
    "validate_c2d_enqueue",
    "validate_c2d_expiry",
    "validate_c2d_message",
    "validate_d2c_message",
    "validate_message_id",
    "validate_method_name",
    "validate_method_payload",
    "validate_method_timeouts",
    "validate_twin_key",
    "validate_twin_section",
]

KB = 1024

# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------

# Codes and names from D-ERR (cross-checked against CS-ERR). Only the ones this package uses.
ERROR_NAMES: Mapping[int, str] = {
    400004: "ArgumentInvalid",
    400006: "IotHubFormatError",       # CS-ERR: "a JSON object ... cannot be parsed"
    401002: "IotHubUnauthorizedAccess",
    401003: "IotHubUnauthorized",
    403004: "DeviceMaximumQueueDepthExceeded",
    403009: "InvalidMessageExpiryTime",
    403010: "OperationNotAvailableInCurrentTier",
    413001: "MessageTooLarge",
    429001: "ThrottlingException",
    429002: "ThrottleBacklogLimitExceeded",
    429003: "ThrottlingBacklogTimeout",
}


@dataclass(frozen=True)
class IotHubError:
    """An IoT Hub error: six-digit code (HTTP status x 1000 + detail), its name and a message.

    `status` is the HTTP status (or the status of a twin response topic, `$iothub/twin/res/{status}`).
    `body()` gives the JSON error body shape the fake uses (`errorCode`/`message`; the real body's
    exact shape is an assumption, iothub-mqtt.md §5.2).
    """
    code: int
    name: str
    message: str

    @property
    def status(self) -> int:
        return self.code // 1000

    def body(self, *, timestamp_utc: str | None = None, tracking_id: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"errorCode": self.code, "message": self.message}
        if tracking_id is not None:
            out["trackingId"] = tracking_id
        if timestamp_utc is not None:
            out["timestampUtc"] = timestamp_utc
        return out

    def __str__(self) -> str:
        return f"{self.code} {self.name}: {self.message}"


def iothub_error(code: int, message: str) -> IotHubError:
    """An `IotHubError` with the documented name for `code` (`GenericError` for codes not listed)."""
    return IotHubError(code, ERROR_NAMES.get(code, "GenericError"), message)


def _show(text: str, limit: int = 40) -> str:
    """A short, printable rendering of user data for error messages (never the whole input)."""
    shown = repr(text[:limit])
    return shown + ("..." if len(text) > limit else "")


def _utf8_len(text: str) -> int:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:  # lone surrogates: count them as the 3 bytes they would take
        return len(text.encode("utf-8", "surrogatepass"))


# --------------------------------------------------------------------------------------------
# Device twins
# --------------------------------------------------------------------------------------------

# D-TWIN "Device twin size" and D-QT "Twins": 8 KB for tags, 32 KB each for desired and reported.
# (failover-facts.md says 32 KB for tags too; both documents say 8 KB.)
TWIN_SECTION_MAX_BYTES: Mapping[str, int] = {"tags": 8 * KB, "desired": 32 * KB, "reported": 32 * KB}
TWIN_MAX_DEPTH = 10                   # D-TWIN "Depth": the example nests ten objects below the section
TWIN_MAX_KEY_BYTES = 1 * KB           # D-TWIN "Keys": UTF-8, up to 1 KB
TWIN_MAX_STRING_BYTES = 4 * KB        # D-TWIN "String values ... maximum length of 4 KB"
TWIN_INT_MIN = -4503599627370496      # D-TWIN: "minimum value of -4503599627370496" (= -2**52)
TWIN_INT_MAX = 4503599627370495       # D-TWIN: "maximum value of 4503599627370495" (= 2**52 - 1)
TWIN_READ_ONLY_KEYS = frozenset({"$version", "$metadata"})  # D-TWIN: excluded from the size limit

_NUMBER_SIZE = 8   # D-TWIN: "numeric values (8 Bytes)"
_BOOL_SIZE = 4     # D-TWIN: "Boolean values (4 Bytes)"
_NULL_SIZE = 0     # assumption: null only appears in patches, where it deletes a property

# D-TWIN: keys exclude "UNICODE control characters (segments C0 and C1), and '.', '$', and SP".
# U+007F (DEL) is taken as a control character too (Unicode category Cc) - assumption.
_FORBIDDEN_KEY_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f.$ ]")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def validate_twin_key(key: object) -> IotHubError | None:
    """A twin property name: a UTF-8 string of at most 1 KB without `.`, `$`, space or control chars."""
    if not isinstance(key, str):
        return iothub_error(400004, f"twin property name must be a string, not {type(key).__name__}")
    size = _utf8_len(key)
    if size > TWIN_MAX_KEY_BYTES:
        return iothub_error(400004, f"twin property name {_show(key)} is {size} bytes; "
                                    f"IoT Hub allows at most {TWIN_MAX_KEY_BYTES}")
    bad = _FORBIDDEN_KEY_CHARS.search(key)
    if bad:
        # CS-ERR notes that invalid characters in a twin property name come back as 400004
        return iothub_error(400004, f"twin property name {_show(key)} contains {bad.group()!r}; IoT Hub "
                                    "forbids '.', '$', space and control characters in property names")
    return None


def _string_size(text: str) -> int:
    # D-TWIN: strings count "all characters, excluding UNICODE control characters". Counted here as
    # UTF-8 bytes (assumption: the same as characters for ASCII, larger for other text).
    return _utf8_len(_CONTROL_CHARS.sub("", text)) if _CONTROL_CHARS.search(text) else _utf8_len(text)


def _scalar_problem(value: object, at: tuple[str | int, ...]) -> tuple[IotHubError | None, int]:
    """(error, size) for a JSON scalar; size per D-TWIN "Device twin size"."""
    if value is None:
        return None, _NULL_SIZE
    if isinstance(value, bool):           # before int: bool is an int subclass
        return None, _BOOL_SIZE
    if isinstance(value, int):
        if not TWIN_INT_MIN <= value <= TWIN_INT_MAX:
            return iothub_error(400004, f"twin value at {_path(at)} is {value}; IoT Hub integers must lie within "
                                        f"{TWIN_INT_MIN}..{TWIN_INT_MAX}"), 0
        return None, _NUMBER_SIZE
    if isinstance(value, float):
        # the integer range applies to JSON integers only; fractions and exponents pass (assumption)
        if not math.isfinite(value):
            return iothub_error(400004, f"twin value at {_path(at)} is {value}, which JSON cannot express"), 0
        return None, _NUMBER_SIZE
    if isinstance(value, str):
        size = _utf8_len(value)
        if size > TWIN_MAX_STRING_BYTES:
            return iothub_error(400004, f"twin string at {_path(at)} is {size} bytes; IoT Hub allows at most "
                                        f"{TWIN_MAX_STRING_BYTES}"), 0
        return None, _string_size(value)
    return iothub_error(400004, f"twin value at {_path(at)} is a {type(value).__name__}, not a JSON value"), 0


def _path(keys: tuple[str | int, ...]) -> str:
    if not keys:
        return "the top level"
    return "/".join(_show(k, 20) if isinstance(k, str) else f"[{k}]" for k in keys)


def _walk_twin(doc: object, section: str, allow_read_only: bool) -> tuple[IotHubError | None, int]:
    """Validate and size a twin section iteratively (explicit stack, so depth costs heap, not stack).

    The walk stops at the first violation; the depth limit also bounds it on cyclic input.
    """
    limit = TWIN_SECTION_MAX_BYTES[section]
    if not isinstance(doc, Mapping):
        return iothub_error(400004, f"twin {section} must be a JSON object, not {type(doc).__name__}"), 0
    total = 0
    # entries: (container, depth of container, path of keys to it)
    stack: list[tuple[Mapping[Any, Any] | Sequence[Any], int, tuple[str | int, ...]]] = [(doc, 0, ())]
    while stack:
        container, depth, path = stack.pop()
        is_object = isinstance(container, Mapping)
        items: Iterable[tuple[Any, Any]] = container.items() if isinstance(container, Mapping) \
            else enumerate(container)
        for key, value in items:
            if is_object:
                if depth == 0 and allow_read_only and key in TWIN_READ_ONLY_KEYS:
                    continue
                err = validate_twin_key(key)
                if err:
                    return err, total
                total += _string_size(str(key))
            if isinstance(value, (Mapping, list, tuple)):
                # D-TWIN counts object depth; arrays (supported since the 2024 revision) are counted
                # as a level too (assumption)
                if depth + 1 > TWIN_MAX_DEPTH:
                    return iothub_error(400004, f"twin {section} nests deeper than {TWIN_MAX_DEPTH} levels "
                                                f"at {_path(path + (key,))}"), total
                stack.append((value, depth + 1, path + (key,)))
            else:
                err, size = _scalar_problem(value, path + (key,))
                if err:
                    return err, total
                total += size
            if total > limit:
                return iothub_error(400004, f"twin {section} exceeds IoT Hub's {limit // KB} KB limit "
                                            f"(more than {limit} bytes counted by the twin size rule)"), total
    return None, total


def validate_twin_section(doc: object, section: str, *, allow_read_only: bool = False) -> IotHubError | None:
    """Check one twin section - `"tags"`, `"desired"` or `"reported"` - against D-TWIN's rules.

    `doc` is the parsed JSON object of the section (a patch, or the section after merging a patch).
    Checks: keys (`validate_twin_key`), string values <= 4 KB, integers within
    [-4503599627370496, 4503599627370495], nesting at most 10 levels below the section, and the
    section size (8 KB tags, 32 KB desired/reported) by D-TWIN's size rule: the sum over all
    properties of key length plus value size, where strings count their characters without control
    characters, numbers 8 bytes, booleans 4 bytes, nested objects the sum of their contents.

    D-TWIN: "IoT Hub rejects with an error all operations that would increase the size ... above
    the limit", so check the merged result for size; checking the patch as well catches invalid
    keys that a merge would delete. Arrays are accepted (D-TWIN 2024: "Arrays are also supported").
    `allow_read_only=True` skips top-level `$version` and `$metadata`, as in a stored section.

    All violations return 400004 ArgumentInvalid (documented for invalid property names by CS-ERR;
    the code for the size, depth and value limits is an assumption). Over MQTT the device sees it as
    status 400 on `$iothub/twin/res/400/?$rid=...` (iothub-mqtt.md §5.2).

    Never recursive: a 100,000-level structure returns an error instead of raising RecursionError.
    """
    if section not in TWIN_SECTION_MAX_BYTES:
        return iothub_error(400004, f"unknown twin section {section!r}; expected tags, desired or reported")
    err, _ = _walk_twin(doc, section, allow_read_only)
    return err


def twin_section_size(doc: Mapping[str, Any], *, section: str = "reported", allow_read_only: bool = True) -> int:
    """The section's size by D-TWIN's rule, for reporting. Counting stops past the section limit."""
    _, size = _walk_twin(doc, section, allow_read_only)
    return size


# a JSON string (possibly unterminated, to the end of the text) or one bracket
_JSON_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?|[\[\]{}]', re.DOTALL)


def json_nesting_depth(text: str | bytes, *, stop_after: int | None = None) -> int:
    """The deepest bracket nesting (`{` and `[`) in JSON text, found by scanning, not parsing.

    Brackets inside strings are ignored. With `stop_after`, scanning ends as soon as the depth passes
    it, so hostile input costs no more than its length. Used before `json.loads`, whose C scanner
    recurses per level and raises RecursionError on very deep input.
    """
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    depth = deepest = 0
    for match in _JSON_TOKEN.finditer(data):
        token = match.group()
        if token in (b"{", b"["):
            depth += 1
            if depth > deepest:
                deepest = depth
                if stop_after is not None and deepest > stop_after:
                    return deepest
        elif token in (b"}", b"]"):
            depth -= 1
    return deepest


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def loads_json(body: str | bytes, *, max_depth: int = TWIN_MAX_DEPTH + 1,
               what: str = "payload") -> tuple[Any, IotHubError | None]:
    """Parse a JSON body from a device or a caller without risking RecursionError.

    Returns `(value, None)` or `(None, error)`. Input nested deeper than `max_depth` brackets is refused
    before parsing (400004); text that is not JSON - including NaN and Infinity, which Python's json
    accepts by default - gives 400006 IotHubFormatError (CS-ERR). The default depth fits a twin
    section: the section object itself plus ten levels below it.
    """
    depth = json_nesting_depth(body, stop_after=max_depth)
    if depth > max_depth:
        return None, iothub_error(400004, f"{what} nests JSON deeper than {max_depth} levels")
    try:
        text = body.decode("utf-8") if isinstance(body, (bytes, bytearray)) else body
        return json.loads(text, parse_constant=_reject_constant), None
    except (UnicodeDecodeError, ValueError) as exc:
        reason = "is not UTF-8" if isinstance(exc, UnicodeDecodeError) else f"is not valid JSON ({exc})"
        return None, iothub_error(400006, f"{what} {reason}")


# --------------------------------------------------------------------------------------------
# Direct methods
# --------------------------------------------------------------------------------------------

METHOD_MAX_PAYLOAD_BYTES = 128 * KB     # D-QT "Direct method": 128 KB for the request and for the response
METHOD_RESPONSE_TIMEOUT_DEFAULT = 30    # D-DM; C# reference: default 30 s
METHOD_RESPONSE_TIMEOUT_MIN = 5         # C# reference: "minimum is 5 seconds"
METHOD_RESPONSE_TIMEOUT_MAX = 300       # C# reference: "maximum is 300 seconds" (the 2018 D-DM said 3600)
METHOD_CONNECT_TIMEOUT_DEFAULT = 0      # C# reference: 0 = the device must already be online
METHOD_CONNECT_TIMEOUT_MAX = 300        # C# reference: "maximum value ... is 300 seconds"

# D-DM: names "can only contain US-ASCII printable alphanumeric, except any in the following set:
# $ ( ) < > @ , ; : \ " / [ ] ? = { } SP HT". Read as: printable ASCII without those characters.
_METHOD_NAME_FORBIDDEN = set('$()<>@,;:\\"/[]?={} \t')


def validate_method_name(name: object) -> IotHubError | None:
    """A direct method name: non-empty printable US-ASCII without `$ ( ) < > @ , ; : \\ " / [ ] ? = { }`,
    space or tab (D-DM). The code, 400004, is an assumption; an empty name is refused (assumption)."""
    if not isinstance(name, str) or not name:
        return iothub_error(400004, "direct method name must be a non-empty string")
    for ch in name:
        if not 0x20 < ord(ch) < 0x7F or ch in _METHOD_NAME_FORBIDDEN:
            return iothub_error(400004, f"direct method name {_show(name)} contains {ch!r}; IoT Hub allows "
                                        "printable US-ASCII except $ ( ) < > @ , ; : \\ \" / [ ] ? = { } SP HT")
    return None


def validate_method_payload(payload: bytes | str | int, *, direction: str = "request") -> IotHubError | None:
    """Request or response payload (serialized JSON, or its length in bytes) <= 128 KB (D-QT).

    413001 MessageTooLarge is an assumption for the code (D-ERR lists it for too-large messages).
    """
    size = payload if isinstance(payload, int) else _byte_len(payload)
    if size > METHOD_MAX_PAYLOAD_BYTES:
        return iothub_error(413001, f"direct method {direction} payload is {size} bytes; IoT Hub allows at most "
                                    f"{METHOD_MAX_PAYLOAD_BYTES} (128 KB)")
    return None


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_method_timeouts(response_timeout: object = None, connect_timeout: object = None) -> IotHubError | None:
    """`responseTimeoutInSeconds` within 5..300 and `connectTimeoutInSeconds` within 0..300; None
    means the default (30 and 0, see the constants). Code 400004 is an assumption."""
    if response_timeout is not None and not (
            _is_number(response_timeout)
            and METHOD_RESPONSE_TIMEOUT_MIN <= response_timeout <= METHOD_RESPONSE_TIMEOUT_MAX):  # type: ignore[operator]
        return iothub_error(400004, f"responseTimeoutInSeconds {response_timeout!r} is outside "
                                    f"{METHOD_RESPONSE_TIMEOUT_MIN}..{METHOD_RESPONSE_TIMEOUT_MAX}")
    if connect_timeout is not None and not (
            _is_number(connect_timeout) and 0 <= connect_timeout <= METHOD_CONNECT_TIMEOUT_MAX):  # type: ignore[operator]
        return iothub_error(400004, f"connectTimeoutInSeconds {connect_timeout!r} is outside "
                                    f"0..{METHOD_CONNECT_TIMEOUT_MAX}")
    return None


# --------------------------------------------------------------------------------------------
# Messages: size rule shared by D2C and C2D
# --------------------------------------------------------------------------------------------

def _byte_len(value: bytes | bytearray | memoryview | str) -> int:
    return _utf8_len(value) if isinstance(value, str) else len(value)


def message_size(body: bytes | str, properties: Mapping[str, str | None] | None = None) -> int:
    """A message's size by D-MSG's rule: body bytes + system property values + application
    property names and values.

    `properties` is the decoded property bag: keys starting with `$.` (`$.mid`, `$.ct`, ...) are system
    properties and count their value only; every other key is an application property and counts
    name and value. None values count 0. Non-ASCII text counts its UTF-8 bytes (D-MSG says
    properties are ASCII, so length and bytes agree there).
    """
    size = _byte_len(body)
    for key, value in (properties or {}).items():
        if not key.startswith("$."):
            size += _utf8_len(key)
        if value is not None:
            size += _utf8_len(value)
    return size


D2C_MAX_MESSAGE_BYTES = 256 * KB   # D-QT "Device-to-cloud messaging: Maximum message size 256 KB"
MESSAGE_ID_MAX_CHARS = 128         # D-MSG message-id: "up to 128 characters long"
# D-MSG message-id format: ASCII 7-bit alphanumerics + - : . + % _ # * ? ! ( ) , = @ ; $ '
_MESSAGE_ID_CHARS = re.compile(r"[A-Za-z0-9\-:.+%_#*?!(),=@;$']*")


def validate_message_id(message_id: object, *, check_charset: bool = False) -> IotHubError | None:
    """`$.mid` at most 128 characters (D-MSG). `check_charset=True` also applies D-MSG's character set;
    off by default because no source says the hub refuses other characters (it is documented as the
    format, and the SDKs pass any string through). Code 400004 is an assumption."""
    if not isinstance(message_id, str):
        return iothub_error(400004, f"message id must be a string, not {type(message_id).__name__}")
    if len(message_id) > MESSAGE_ID_MAX_CHARS:
        return iothub_error(400004, f"message id {_show(message_id)} is {len(message_id)} characters; "
                                    f"IoT Hub allows at most {MESSAGE_ID_MAX_CHARS}")
    if check_charset and not _MESSAGE_ID_CHARS.fullmatch(message_id):
        return iothub_error(400004, f"message id {_show(message_id)} has characters outside IoT Hub's message "
                                    "id format (ASCII letters, digits and - : . + % _ # * ? ! ( ) , = @ ; $ ')")
    return None


def validate_d2c_message(body: bytes | str, properties: Mapping[str, str | None] | None = None) -> IotHubError | None:
    """A device-to-cloud message: size (`message_size`) <= 256 KB and `$.mid` <= 128 characters.

    What the real hub does with an oversized message over MQTT is not documented (iothub-mqtt.md
    §1.8: no PUBACK, or a closed connection); the fake closes the connection without PUBACK. The
    code 413001 MessageTooLarge is from D-ERR's table.
    """
    size = message_size(body, properties)
    if size > D2C_MAX_MESSAGE_BYTES:
        return iothub_error(413001, f"device-to-cloud message is {size} bytes (body and properties); "
                                    f"IoT Hub allows at most {D2C_MAX_MESSAGE_BYTES} (256 KB)")
    mid = (properties or {}).get("$.mid")
    if mid is not None:
        return validate_message_id(mid)
    return None


# --------------------------------------------------------------------------------------------
# Cloud-to-device messages
# --------------------------------------------------------------------------------------------

C2D_MAX_MESSAGE_BYTES = 64 * KB    # D-QT "Cloud-to-device messaging: Maximum message size 64 KB"
C2D_QUEUE_LIMIT = 50               # D-QT / D-C2D: at most 50 messages queued per device
C2D_DEFAULT_TTL = 3600.0           # D-C2D defaultTtlAsIso8601: default one hour
C2D_MIN_DEFAULT_TTL = 60.0         # D-C2D: the hub's default TTL is at least one minute
C2D_MAX_TTL = 2 * 86400.0          # D-C2D: "up to two days"
C2D_ACK_VALUES = ("none", "positive", "negative", "full")   # D-C2D "Message feedback"; none is the default

# D-MSG: for C2D messages "Property names and values can only contain ASCII alphanumeric characters,
# plus ! # $ % & ' * + - . ^ _ ` | ~".
_C2D_PROPERTY_CHARS = re.compile(r"[A-Za-z0-9!#$%&'*+\-.^_`|~]*")


def validate_c2d_ack(value: object) -> IotHubError | None:
    """`iothub-ack` must be none, positive, negative or full (D-C2D). Code 400004 is an assumption."""
    if value is None or value in C2D_ACK_VALUES:
        return None
    return iothub_error(400004, f"iothub-ack {value!r} is not one of {', '.join(C2D_ACK_VALUES)}")


def validate_c2d_message(body: bytes | str, properties: Mapping[str, str | None] | None = None, *,
                         check_charset: bool = True) -> IotHubError | None:
    """A cloud-to-device message as a service sends it: size <= 64 KB by D-MSG's rule (applying the
    D2C size rule to C2D is an assumption: D-MSG calls it protocol-agnostic), `iothub-ack` valid,
    `$.mid` <= 128 characters, and (with `check_charset`) property names and values in D-MSG's C2D
    character set. Properties use the same `$.`-prefixed keys as `message_size`.
    Codes: 413001 for size (D-ERR), 400004 otherwise (assumption).
    """
    size = message_size(body, properties)
    if size > C2D_MAX_MESSAGE_BYTES:
        return iothub_error(413001, f"cloud-to-device message is {size} bytes (body and properties); "
                                    f"IoT Hub allows at most {C2D_MAX_MESSAGE_BYTES} (64 KB)")
    props = properties or {}
    err = validate_c2d_ack(props.get("iothub-ack"))
    if err:
        return err
    if props.get("$.mid") is not None:
        err = validate_message_id(props["$.mid"])
        if err:
            return err
    if check_charset:
        for key, value in props.items():
            if key.startswith("$.") or key == "iothub-ack":
                continue
            for text, what in ((key, "name"), (value or "", "value")):
                if not _C2D_PROPERTY_CHARS.fullmatch(text):
                    return iothub_error(400004, f"cloud-to-device property {what} {_show(text)} has characters "
                                                "IoT Hub does not allow (ASCII letters, digits and ! # $ % & ' * "
                                                "+ - . ^ _ ` | ~ only)")
    return None


def validate_c2d_enqueue(pending: int) -> IotHubError | None:
    """Refuse a new C2D message when `pending` are already queued for the device (limit 50).

    403004 DeviceMaximumQueueDepthExceeded per D-ERR ("the number of messages enqueued for the device
    exceeds the queue limit").
    """
    if pending >= C2D_QUEUE_LIMIT:
        return iothub_error(403004, f"device already has {pending} cloud-to-device messages queued; "
                                    f"IoT Hub allows at most {C2D_QUEUE_LIMIT}")
    return None


def validate_c2d_default_ttl(ttl: object) -> IotHubError | None:
    """The hub setting `defaultTtlAsIso8601`, in seconds: one minute to two days (D-C2D)."""
    if not (_is_number(ttl) and C2D_MIN_DEFAULT_TTL <= ttl <= C2D_MAX_TTL):  # type: ignore[operator]
        return iothub_error(400004, f"default C2D time to live {ttl!r} s is outside "
                                    f"{C2D_MIN_DEFAULT_TTL:g}..{C2D_MAX_TTL:g} s")
    return None


def validate_c2d_expiry(now: float, expiry_time: float) -> IotHubError | None:
    """A per-message absolute expiry (`ExpiryTimeUtc`, epoch seconds) at most two days after `now`.

    D-C2D gives two days as the maximum; that the hub refuses a later expiry with 403009
    InvalidMessageExpiryTime (D-ERR's name for a bad expiry) rather than capping it is an assumption.
    An expiry in the past is accepted: the message is dead-lettered without delivery (`c2d_expired`).
    """
    if not (_is_number(now) and _is_number(expiry_time)):
        return iothub_error(400004, "C2D expiry and the current time must be finite numbers of seconds")
    if expiry_time - now > C2D_MAX_TTL:
        return iothub_error(403009, f"C2D message expires {expiry_time - now:.0f} s from now; IoT Hub allows at "
                                    f"most {C2D_MAX_TTL:.0f} s (two days)")
    return None


def c2d_expiry(now: float, *, expiry_time: float | None = None, default_ttl: float = C2D_DEFAULT_TTL) -> float:
    """The absolute expiry of a C2D message: its own `expiry_time`, else `now` + the hub's default TTL
    (D-C2D: "Either ... ExpiryTimeUtc ... or the default time to live"). Validate first."""
    return expiry_time if expiry_time is not None else now + default_ttl


def c2d_expired(expiry: float, now: float) -> bool:
    """True once a message must be dead-lettered instead of delivered (D-C2D). A message is taken as
    expired at its expiry instant (assumption on the boundary)."""
    return now >= expiry


# --------------------------------------------------------------------------------------------
# MQTT topics: property bags
# --------------------------------------------------------------------------------------------

# Characters a property bag may carry raw: RFC 2396 "unreserved" (D-MQTT: names and values are
# RFC 2396-encoded), '=' and '&' as the bag's own separators, '%' only as the start of an escape,
# and '$', which D-MQTT's own examples leave raw in system keys (`$.ct=`).
_BAG_RAW_MARKS = "-_.!~*'()=&$"  # '-' first: it stays literal at the start of a regex class
_BAG_RAW_OK = frozenset(string.ascii_letters + string.digits + _BAG_RAW_MARKS)
_HEX = frozenset(string.hexdigits)
_EVENTS = "/messages/events/"
_RAW_CLASS = f"[{_BAG_RAW_MARKS}A-Za-z0-9]"
# the same rule as two searches (one with an alternation is several times slower), for the hub's
# hot path: anything they find is looked at closely
_BAG_ODD_CHAR = re.compile(f"[^{_BAG_RAW_MARKS}A-Za-z0-9%]")
_BAG_ODD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
# The same rule as a whole-bag match, the hub's screen for every telemetry message:
# plain_bag(topic, start) matches when topic[start:] holds only what may travel raw and %XX
# escapes, so property_bag_problem would find nothing (it needs to look only when this fails).
# Faster than the two searches on a bag with escapes, as an SDK's $.ct=application%2Fjson has.
plain_bag = re.compile(f"{_RAW_CLASS}*(?:%[0-9A-Fa-f]{{2}}{_RAW_CLASS}*)*").fullmatch


def _bag_of(topic: str) -> str | None:
    """The raw property bag of a telemetry topic, or the query of a `$iothub/` topic."""
    at = topic.find(_EVENTS)
    if topic.startswith("devices/") and at != -1:
        bag = topic[at + len(_EVENTS):]
        # Node appends '/' after an output's bag (iothub-mqtt.md §3.1); a leading '?' is taken as part
        # of the first name, not as an error (Azure support, quoted in nrfconnect/sdk-nrf PR #5906)
        return bag.removesuffix("/").removeprefix("?")
    if topic.startswith("$iothub/"):
        _, sep, query = topic.partition("?")
        return query if sep else None
    return None


def property_bag_problem(topic: str) -> str | None:
    """Why IoT Hub would close the connection over this PUBLISH topic's property bag, or None.

    Works on the raw topic string, before any decoding. Reported: a raw ':' (a timestamp or message
    id such as `00:11:22:33`) disconnected the C SDK (azure-iot-sdk-c #869); a raw space gave an
    endless reconnect loop (amenzhinsky/iothub #54); "the hub will see them as garbage URL"
    (azure-iot-sdk-c #1695); "MQTT will sever the connection with no error message"
    (azure-iot-sdk-java PR #743). Only ':' and space are reported; refusing every other character
    RFC 2396 wants encoded (and a '%' that does not start a two-digit hex escape, and non-ASCII) is
    an assumption by extension.
    """
    bag = _bag_of(topic)
    if not bag or not (_BAG_ODD_CHAR.search(bag) or _BAG_ODD_ESCAPE.search(bag)):
        return None
    i, n = 0, len(bag)
    while i < n:
        ch = bag[i]
        if ch == "%":
            if i + 2 >= n or bag[i + 1] not in _HEX or bag[i + 2] not in _HEX:
                return f"property bag has a '%' at offset {i} that is not a %XX escape"
            i += 3
            continue
        if ch not in _BAG_RAW_OK:
            return (f"property bag has a raw {ch!r} at offset {i}; IoT Hub requires property names and values "
                    "to be URL-encoded and closes the connection otherwise")
        i += 1
    return None


def property_bag_breaks_connection(topic: str) -> bool:
    """Predicate form of `property_bag_problem`: True when the hub would close the connection."""
    return property_bag_problem(topic) is not None


# --------------------------------------------------------------------------------------------
# MQTT user name and SAS key choice
# --------------------------------------------------------------------------------------------

def parse_device_username(username: object) -> Username | IotHubError:
    """Split a CONNECT user name, also accepting the forms `auth.parse_username` refuses.

    Accepted: `{host}/{device}[/{module}]/?{query}` (D-MQTT), the older `{host}/{device}/api-version=...`
    without '?' (iothub-mqtt.md §1.2.1), and no query at all - `{host}/{device}/`, `{host}/{device}`,
    `{host}/{device}/?` - which D-MQTT implies is accepted ("It's recommended to include api-version
    ... Otherwise it could cause unexpected behaviors"); then `api_version` is None.
    Host and ids are not decoded (D-MQTT; PY SDK note), query values are.
    An error here means CONNACK 5 over MQTT (iothub-mqtt.md §1.7: the code for a malformed user name
    is uncertain; 0x05 is what the fake sends). The error code 400004 is an assumption.
    """
    if not isinstance(username, str) or not username:
        return iothub_error(400004, "CONNECT has no user name")
    hostname, sep, rest = username.partition("/")
    device_id, _, rest = rest.partition("/")
    if not sep or not hostname or not device_id:
        return iothub_error(400004, "user name is not '{hostname}/{device_id}/?api-version=...'")
    module_id: str | None = None
    if rest and not rest.startswith("?") and not rest.startswith("api-version="):
        module_id, _, rest = rest.partition("/")
    query = rest.removeprefix("?")
    params: dict[str, str] = {}
    for item in query.split("&"):
        if item:
            k, _, v = item.partition("=")
            params[unquote(k)] = unquote(v)
    return Username(hostname, device_id, module_id or None, params)


DEVICE_CONNECT = "DeviceConnect"
# D-SAS: the default shared access policies and their permissions.
DEFAULT_POLICY_PERMISSIONS: Mapping[str, frozenset[str]] = {
    "iothubowner": frozenset({"RegistryRead", "RegistryWrite", "ServiceConnect", "DeviceConnect"}),
    "service": frozenset({"ServiceConnect"}),
    "device": frozenset({"DeviceConnect"}),
    "registryRead": frozenset({"RegistryRead"}),
    "registryReadWrite": frozenset({"RegistryRead", "RegistryWrite"}),
}


@dataclass(frozen=True)
class AccessPolicy:
    """A hub-level shared access policy. Keys never appear in its repr."""
    name: str
    primary_key: str = field(repr=False)
    secondary_key: str = field(default="", repr=False)
    permissions: frozenset[str] = frozenset({DEVICE_CONNECT})


PERMISSIONS = ("RegistryRead", "RegistryWrite", "ServiceConnect", DEVICE_CONNECT)  # D-SAS


def default_policies(new_key: Callable[[], str]) -> dict[str, AccessPolicy]:
    """The policies a newly created IoT hub has (D-SAS), each with two fresh keys from `new_key`."""
    return {name: AccessPolicy(name, new_key(), new_key(), perms)
            for name, perms in DEFAULT_POLICY_PERMISSIONS.items()}


def sas_keys_to_try(skn: str | None, *, identity_keys: Sequence[str],
                    policies: Mapping[str, AccessPolicy] | Iterable[AccessPolicy] = ()) -> tuple[str, ...] | IotHubError:
    """Which keys may have signed a device's SAS token, given its `skn` field (None when absent).

    D-SAS: a token without `skn` is signed with the device's (or module's) own key; a token with
    `skn={policy}` is signed with that shared access policy's key and is valid device credentials
    when the policy grants DeviceConnect (for example the default `device` policy). Returns the
    non-empty keys to check the signature against, primary first, or an error: 401002
    IotHubUnauthorizedAccess (D-ERR) for an unknown policy or one without DeviceConnect, which the
    device sees as CONNACK 5 (iothub-mqtt.md §1.7). Policy names are compared exactly (assumption).
    The error message names the policy, never a key.
    """
    if skn is None:
        keys = tuple(k for k in identity_keys if k)
        return keys or iothub_error(401002, "the device has no symmetric key to check the SAS token against")
    by_name = policies if isinstance(policies, Mapping) else {p.name: p for p in policies}
    policy = by_name.get(skn)
    if policy is None:
        return iothub_error(401002, f"SAS token names shared access policy {_show(skn)}, which this hub "
                                    "does not have")
    if DEVICE_CONNECT not in policy.permissions:
        return iothub_error(401002, f"shared access policy {_show(skn)} does not grant DeviceConnect")
    keys = tuple(k for k in (policy.primary_key, policy.secondary_key) if k)
    return keys or iothub_error(401002, f"shared access policy {_show(skn)} has no key")
