"""Connection strings, SAS tokens and MQTT user names as IoT Hub uses them.

Pure functions: nothing here touches the network or the hub's state.
"""
import base64
import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

from ..connstr import parse_connection_string  # noqa: F401  (re-exported: older code imports it here)
from ..errors import AuthError

DEFAULT_CLOCK_SKEW = 300.0  # IoT Hub accepts tokens up to five minutes past their expiry
_EXPIRY = re.compile(r"[0-9]{1,12}")




def redact(text: str) -> str:
    """Hide secret values in connection strings and SAS tokens, keeping the rest readable."""
    text = re.sub(r"(SharedAccessKey=)[^;\s'\"]+", r"\1<redacted>", text)
    text = re.sub(r"(sig=)[^&;\s'\"]+", r"\1<redacted>", text)
    return text


def device_connection_string(hostname: str, device_id: str, key: str,
                             gateway_host: str | None = None) -> str:
    cs = f"HostName={hostname};DeviceId={device_id};SharedAccessKey={key}"
    if gateway_host:
        cs += f";GatewayHostName={gateway_host}"
    return cs


def _sign(key_b64: str, sr_raw: str, se: str) -> str:
    try:
        key = base64.b64decode(key_b64, validate=True)
    except (ValueError, TypeError):
        raise AuthError("shared access key is not valid base64") from None
    digest = hmac.new(key, f"{sr_raw}\n{se}".encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def sas_token_for(resource_uri: str, key_b64: str, expiry: float, key_name: str | None = None) -> str:
    """A SAS token as the SDKs build it: sr is URL-encoded, the signature covers it as sent.
    `expiry` is absolute (epoch seconds); pytest_iotfailover.sas.make_sas_token takes a ttl."""
    se = str(int(expiry))
    sr = quote(resource_uri, safe="")
    sig = quote(_sign(key_b64, sr, se), safe="")
    token = f"SharedAccessSignature sr={sr}&sig={sig}&se={se}"
    if key_name:
        token += f"&skn={quote(key_name, safe='')}"
    return token


@dataclass
class SasToken:
    sr_raw: str       # exactly as received: the signature is computed over it
    audience: str     # fully percent-decoded
    signature: str    # URL-decoded base64
    expiry: int
    key_name: str | None = None


def parse_sas_token(token: str) -> SasToken:
    prefix = "SharedAccessSignature "
    if not token.startswith(prefix):
        raise AuthError("password is not a SharedAccessSignature token")
    fields: dict[str, str] = {}
    for part in token[len(prefix):].split("&"):
        k, sep, v = part.partition("=")
        if not sep:
            raise AuthError(f"SAS token field {k[:10]!r} has no value")
        fields[k.lower()] = v
    missing = [f for f in ("sr", "sig", "se") if f not in fields]
    if missing:
        raise AuthError(f"SAS token lacks {', '.join(missing)}")
    # Whole seconds since 1970 as plain ASCII digits. int() alone would also take '+1', ' 1',
    # '1_0' or a 400-digit number that no float comparison survives; 12 digits reach year 33658.
    if not _EXPIRY.fullmatch(fields["se"]):
        raise AuthError("SAS token expiry 'se' is not a number of seconds (1 to 12 digits)")
    expiry = int(fields["se"])
    # tolerate the double encoding some SDKs apply to special characters in ids
    audience = unquote(unquote(fields["sr"]))
    return SasToken(fields["sr"], audience, unquote(fields["sig"]), expiry,
                    unquote(fields["skn"]) if "skn" in fields else None)


def audience_covers(audience: str, target: str) -> bool:
    """True when the token's audience is `target` or a path prefix of it, by whole segments."""
    a = audience.rstrip("/").lower()
    t = target.lower()
    return t == a or t.startswith(a + "/")


def verify_sas_token(token: str, *, hostname: str, device_id: str, keys: Sequence[str],
                     now: float, clock_skew: float = DEFAULT_CLOCK_SKEW,
                     policies: Mapping[str, Any] | None = None) -> SasToken:
    """Check a device SAS token; return it parsed or raise AuthError saying why (no secrets).

    `keys` are the device's own; a token with `skn={policy}` is checked against that policy's keys
    instead, and is valid device credentials when the policy grants DeviceConnect (D-SAS "Use a
    shared access policy to access on behalf of a device"; limits.sas_keys_to_try). `policies` maps
    names to limits.AccessPolicy; an unknown name or one without DeviceConnect is an AuthError,
    which the hub answers with CONNACK 5 as it does for a bad signature (iothub-mqtt.md §1.7).
    """
    # limits.py imports Username from this module, so it cannot be imported at the top
    from .limits import IotHubError, sas_keys_to_try
    t = parse_sas_token(token)
    if now > t.expiry + clock_skew:
        raise AuthError(f"SAS token expired at {t.expiry}")
    candidates = sas_keys_to_try(t.key_name, identity_keys=keys, policies=policies or {})
    if isinstance(candidates, IotHubError):
        raise AuthError(candidates.message)
    target = f"{hostname}/devices/{device_id}"
    if not audience_covers(t.audience, target):
        raise AuthError(f"SAS token audience {t.audience!r} does not cover {target!r}")
    # compare_digest refuses str with non-ASCII characters, and a peer chooses the signature
    presented = t.signature.encode("utf-8", "replace")
    for key in candidates:
        if hmac.compare_digest(_sign(key, t.sr_raw, str(t.expiry)).encode("ascii"), presented):
            return t
    whose = "the device key" if t.key_name is None else f"a key of shared access policy {t.key_name[:40]!r}"
    raise AuthError(f"SAS token signature does not match {whose}")


@dataclass
class Username:
    hostname: str
    device_id: str
    module_id: str | None
    params: dict[str, str]

    @property
    def api_version(self) -> str | None:
        return self.params.get("api-version")


def parse_username(username: str) -> Username:
    """`<hostname>/<device>[/<module>]/?api-version=...` (and the older form without `?`).

    Split on '/' from the left: ids cannot contain '/', but they may contain '?'.
    """
    if not username:
        raise AuthError("CONNECT has no user name")
    parts = username.split("/", 2)
    if len(parts) < 3 or not parts[0] or not parts[1]:
        raise AuthError("user name is not '<hostname>/<device_id>/?api-version=...'")
    hostname, device_id, rest = parts
    module_id = None
    if not rest.startswith("?") and not rest.startswith("api-version="):
        module_id, sep, rest = rest.partition("/")
        if not sep or not module_id:
            raise AuthError("user name has no '/?api-version=' part")
    if rest.startswith("?"):
        rest = rest[1:]
    elif not rest.startswith("api-version="):
        raise AuthError("user name has no '/?api-version=' part")
    params: dict[str, str] = {}
    for item in rest.split("&"):
        if item:
            k, _, v = item.partition("=")
            params[unquote(k)] = unquote(v)
    return Username(hostname, device_id, module_id, params)
