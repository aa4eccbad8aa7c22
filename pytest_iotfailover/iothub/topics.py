"""IoT Hub's MQTT topic grammar: D2C, C2D, twin and method topics and their property bags.

Section numbers refer to the project's notes on the real hub (iothub-mqtt.md).
"""
from typing import Any
from urllib.parse import quote, unquote

from ..errors import ProtocolViolation

SYSTEM_PROPERTY_NAMES = {
    "$.mid": "message_id",
    "$.cid": "correlation_id",
    "$.uid": "user_id",
    "$.to": "to",
    "$.ct": "content_type",
    "$.ce": "content_encoding",
    "$.exp": "expiry_time_utc",
    "$.on": "output_name",
    "$.ifid": "interface_id",
    "$.ctime": "creation_time_utc",
    "$.sub": "component_name",
    "$.diagid": "diagnostic_id",
    "$.diagctx": "diagnostic_context",
    "$.cdid": "edge_connection_device_id",
    "$.cmid": "edge_connection_module_id",
}

TWIN_RES_FILTER = "$iothub/twin/res/#"
TWIN_DESIRED_FILTER = "$iothub/twin/PATCH/properties/desired/#"
METHODS_FILTER = "$iothub/methods/POST/#"
TWIN_GET = "$iothub/twin/GET"
TWIN_REPORTED = "$iothub/twin/PATCH/properties/reported"
METHOD_RESPONSE_PREFIX = "$iothub/methods/res/"


def events_prefix(device_id: str) -> str:
    return f"devices/{device_id}/messages/events"


def c2d_filter(device_id: str) -> str:
    return f"devices/{device_id}/messages/devicebound/#"


def allowed_filters(device_id: str) -> tuple[str, ...]:
    """The topic filters IoT Hub lets a device subscribe to (§7)."""
    return (c2d_filter(device_id), TWIN_RES_FILTER, TWIN_DESIRED_FILTER, METHODS_FILTER)


# raw property key as sent -> (system property?, name): the same few keys recur in every message,
# so one dict lookup replaces unquoting and classifying them; bounded, and a peer's long one-off
# keys never enter it
_KEYS: dict[str, tuple[bool, str]] = {}
_KEYS_MAX = 1024
_KEY_CACHED_LEN = 64


def _remember(cache: dict[str, Any], raw: str, decoded: Any) -> Any:
    """Keep `decoded` for `raw` in a parser cache: short strings only, and at most _KEYS_MAX."""
    if len(raw) <= _KEY_CACHED_LEN:
        if len(cache) >= _KEYS_MAX:
            cache.clear()
        cache[raw] = decoded
    return decoded


def _classify_key(raw: str) -> tuple[bool, str]:
    k = unquote(raw) if "%" in raw else raw
    return _remember(_KEYS, raw, (True, SYSTEM_PROPERTY_NAMES.get(k, k)) if k.startswith("$.") else (False, k))


# escaped property value as sent -> decoded: an SDK escapes the same few values in every message
# ($.ct=application%2Fjson), and unquoting costs about a quarter of parsing such a topic; bounded
# like _KEYS, and long values (ids, payload-like properties) are decoded without entering it
_VALUES: dict[str, str] = {}


def _unquote_value(raw: str) -> str:
    return _remember(_VALUES, raw, unquote(raw))


def parse_query(query: str) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for item in query.split("&"):
        if not item:
            continue
        k, sep, v = item.partition("=")
        out[unquote(k)] = unquote(v) if sep else None
    return out


def encode_property_bag(system: dict[str, str | None], custom: dict[str, str | None]) -> str:
    parts: list[str] = []
    for k, v in list(system.items()) + list(custom.items()):
        key = quote(k, safe="")
        parts.append(key if v is None else f"{key}={quote(str(v), safe='')}")
    return "&".join(parts)


def parse_d2c_topic(prefix: str, topic: str) -> tuple[dict[str, str], dict[str, str]]:
    """(application properties, system properties) of a telemetry topic that starts with `prefix`."""
    rest = topic[len(prefix):]
    if rest and rest[0] != "/":
        raise ProtocolViolation(f"unsupported topic {topic!r}")
    bag = rest[1:].rstrip("/")
    props: dict[str, str] = {}
    sysprops: dict[str, str] = {}
    if bag:
        if "/" in bag:
            raise ProtocolViolation("property bag contains an unencoded '/'")
        keys = _KEYS
        for item in bag.split("&"):
            if not item:
                continue
            k, _, v = item.partition("=")
            if "%" in v:
                v = _VALUES.get(v) or _unquote_value(v)
            system, name = keys.get(k) or _classify_key(k)
            if system:
                sysprops[name] = v
            else:
                props[name] = v
    return props, sysprops


def c2d_topic(device_id: str, message_id: str, properties: dict[str, str | None],
              expiry: str | None = None) -> str:
    """The delivery topic; `expiry` (ISO 8601 UTC), when the sender set one, travels as `$.exp`."""
    system: dict[str, str | None] = {} if expiry is None else {"$.exp": expiry}
    system.update({"$.mid": message_id, "$.to": f"/devices/{device_id}/messages/devicebound"})
    custom = dict(properties)
    custom.setdefault("iothub-ack", "none")
    return f"devices/{device_id}/messages/devicebound/{encode_property_bag(system, custom)}"


def twin_response_topic(status: int, rid: str | None, version: int | None = None) -> str:
    topic = f"$iothub/twin/res/{status}/?$rid={quote(rid or '', safe='')}"
    return topic if version is None else f"{topic}&$version={version}"


def desired_patch_topic(version: int) -> str:
    return f"$iothub/twin/PATCH/properties/desired/?$version={version}"


def method_request_topic(name: str, rid: str) -> str:
    return f"$iothub/methods/POST/{name}/?$rid={rid}"
