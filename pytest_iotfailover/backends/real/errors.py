"""Errors of the real-hub backend, and how a failed service call becomes one.

The texts quote what the service answered, always through redact(): an answer may echo a
key, and nothing from the request (never its Authorization header) is quoted at all.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

from ...errors import RealBackendError
from ...iothub.core import HubOperationError
from ...redaction import redact

_T = TypeVar("_T")




def text_of(value: Any) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "replace")
    return "" if value is None else str(value)


def response_of(exc: BaseException) -> tuple[int | None, Any]:
    """The HTTP status and (JSON-decoded, when it is JSON) body of a failed call."""
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    try:
        text = response.text if response is not None else None
        body = json.loads(text) if text else None
    except (ValueError, TypeError, AttributeError):
        body = getattr(response, "text", None)
    return status, body


def error_code(status: int | None, body: Any) -> int:
    """IoT Hub's six-digit error code, or the status times 1000 when the body has
    none."""
    if isinstance(body, dict):
        for key in ("errorCode", "ErrorCode"):
            if isinstance(body.get(key), int):
                return int(body[key])
        # the registry nests a second JSON document in "Message"
        nested = body.get("Message") or body.get("message")
        if isinstance(nested, str) and nested.lstrip().startswith("{"):
            try:
                return error_code(status, json.loads(nested))
            except ValueError:
                pass
    return (status or 0) * 1000


def error_text(body: Any) -> str:
    if isinstance(body, dict):
        for key in ("message", "Message", "ExceptionMessage"):
            if isinstance(body.get(key), str):
                return str(body[key])
    return text_of(body)


def is_http_error(exc: BaseException) -> bool:
    return getattr(getattr(exc, "response", None), "status_code", None) is not None


def service_failure(what: str, exc: BaseException) -> Exception:
    """What to raise for a failed service call: the hub's answer, or why there was
    none."""
    if is_http_error(exc):
        status, body = response_of(exc)
        code = error_code(status, body)
        detail = error_text(body)[:300]
        return HubOperationError(
            redact(f"{what} failed: HTTP {status} ({code}): {detail}"), code)
    return RealBackendError(redact(f"{what} failed: {type(exc).__name__}: {exc}")[:500])


def call_service(what: str, fn: Callable[..., _T], *args: Any) -> _T:
    """`fn(*args)`, with any failure but our own turned into service_failure()."""
    try:
        return fn(*args)
    except (RealBackendError, HubOperationError):
        raise
    except Exception as exc:
        raise service_failure(what, exc) from None
