"""Service-side calls on a real hub through azure-iot-hub: C2D, direct methods, twins.

Results and errors read as the fake hub's: a method call the device did not answer is a
`MethodResponse`, a refusal is a `HubOperationError` with IoT Hub's error code.
"""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from typing import Any

from ...checks import seconds
from ...iothub import limits
from ...iothub.c2d_lifecycle import expiry_seconds
from ...iothub.core import HubOperationError, MethodResponse, c2d_body
from .errors import (
    RealBackendError,
    call_service,
    error_code,
    error_text,
    is_http_error,
    response_of,
    service_failure,
)
from .registry import HTTP_TIMEOUT, RunDevices

__all__ = ["C2D_TIMEOUT", "METHOD_TIMEOUT_RANGE", "ServiceCalls"]

C2D_TIMEOUT = 60.0  # uamqp's send has no deadline of its own
METHOD_TIMEOUT_RANGE = (5, 300)  # what IoT Hub accepts for responseTimeoutInSeconds


def _method_seconds(timeout: Any) -> int:
    """`timeout` as IoT Hub's responseTimeoutInSeconds: whole seconds, at least 5."""
    number = isinstance(timeout, (int, float)) and not isinstance(timeout, bool)
    if not number or timeout <= 0:
        raise ValueError("method timeout must be a positive number of seconds, "
                         f"got {timeout!r}")
    low, high = METHOD_TIMEOUT_RANGE
    if timeout > high:
        raise ValueError(f"IoT Hub waits at most {high} s for a direct method "
                         f"response, got {timeout!r}")
    return max(low, math.ceil(timeout))


def _c2d_terms(props: dict[str, Any], ttl: Any, expiry_time: Any, ack: Any) -> None:
    """The fake hub's C2D expiry and ack rules (iothub/c2d_lifecycle.py), checked before
    sending so both hubs refuse the same calls; then as azure-iot-hub sends them:
    `expiryTimeUtc` becomes the AMQP absolute-expiry-time (milliseconds since 1970),
    `iothub-ack` an application property."""
    if ttl is not None and expiry_time is not None:
        raise ValueError("give ttl (seconds from now) or expiry_time (absolute), not both")
    now = time.time()
    if ttl is not None:
        expiry_time = now + (seconds("ttl", ttl) or 0.0)
    if expiry_time is not None:
        expiry = expiry_seconds(expiry_time)
        error = limits.validate_c2d_expiry(now, expiry)
        if error is not None:
            raise HubOperationError(f"send_c2d refused: {error.message}", error.code)
        props["expiryTimeUtc"] = int(expiry * 1000)
    if ack is not None:
        error = limits.validate_c2d_ack(ack)
        if error is not None:
            raise HubOperationError(f"send_c2d refused: {error.message}", error.code)
        props["iothub-ack"] = ack


def _without_metadata(section: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in section.items():
        if key == "$metadata":
            continue
        out[key] = _without_metadata(value) if isinstance(value, dict) else value
    return out


class ServiceCalls:
    """The service operations of `Hub`, for the devices of `devices`."""

    def __init__(self, devices: RunDevices):
        self._devices = devices

    def send_c2d(self, device_id: str, body: Any, properties: Any = None, *,
                 ttl: float | None = None, expiry_time: Any = None,
                 ack: str | None = None) -> str:
        registry = self._devices.need_service("send_c2d")
        data = c2d_body(body)
        props = {str(k): ("" if v is None else str(v))
                 for k, v in (properties or {}).items()}
        props.setdefault("messageId", f"c2d-{uuid.uuid4()}")
        _c2d_terms(props, ttl, expiry_time, ack)
        full_id = self._devices.resolve(device_id)
        outcome: list[Any] = []

        def send() -> None:
            try:
                outcome.append(registry.send_c2d_message(full_id, data, props))
            except BaseException as exc:
                outcome.append(exc)

        worker = threading.Thread(target=send, name="iotfailover:c2d", daemon=True)
        worker.start()
        worker.join(C2D_TIMEOUT)
        if worker.is_alive():
            raise RealBackendError(f"sending a C2D message to {full_id!r} did not "
                                   f"finish within {C2D_TIMEOUT:g} s (AMQP port 5671 "
                                   "blocked?)")
        if outcome and isinstance(outcome[0], BaseException):
            what = f"sending a C2D message to {full_id!r}"
            raise service_failure(what, outcome[0]) from None
        return props["messageId"]

    def feedback(self, device_ids: Any = None) -> list[Any]:
        """Not offered: azure-iot-hub reads the feedback endpoint only through
        `IoTHubHttpRuntimeManager.receive_feedback_notification`, which returns None and
        drops the records the hub sent."""
        raise RealBackendError(
            "reading C2D feedback (iothub-ack) is not supported against a real hub: "
            "azure-iot-hub's IoTHubHttpRuntimeManager.receive_feedback_notification "
            "returns None instead of the feedback records; read "
            "/messages/servicebound/feedback with another service SDK")

    def invoke_method(self, device_id: str, method_name: str, payload: Any = None,
                      timeout: float = 30.0) -> MethodResponse:
        registry = self._devices.need_service("invoke_method")
        from azure.iot.hub.models import CloudToDeviceMethod  # type: ignore[import-untyped]
        seconds = _method_seconds(timeout)
        full_id = self._devices.resolve(device_id)
        request = CloudToDeviceMethod(method_name=method_name, payload=payload,
                                      response_timeout_in_seconds=seconds,
                                      connect_timeout_in_seconds=0)
        devices_api = getattr(getattr(registry, "protocol", None), "devices", None)
        try:
            if devices_api is not None:
                # not the registry manager's own call, which keeps its 60 s read
                # timeout: a method may take longer
                result = devices_api.invoke_method(
                    full_id, request, timeout=(HTTP_TIMEOUT[0], seconds + 30))
            else:
                result = registry.invoke_device_method(full_id, request)
        except Exception as exc:
            answer = _unanswered(exc, seconds)
            if answer is None:
                what = f"invoking {method_name!r} on {full_id!r}"
                raise service_failure(what, exc) from None
            return answer
        return MethodResponse(int(result.status), result.payload)

    def get_twin(self, device_id: str) -> dict[str, Any]:
        registry = self._devices.need_service("get_twin")
        full_id = self._devices.resolve(device_id)
        twin = call_service(f"reading the twin of {full_id!r}", registry.get_twin,
                            full_id)
        props = getattr(twin, "properties", None)
        out = {}
        for part in ("desired", "reported"):
            section = dict(getattr(props, part, None) or {})
            out[part] = _without_metadata(section)
            out[part].setdefault("$version", section.get("$version", 1))
        return out

    def update_desired(self, device_id: str, patch: dict[str, Any]) -> int:
        registry = self._devices.need_service("update_desired")
        if not isinstance(patch, dict):
            raise HubOperationError("desired patch must be a JSON object (dict)",
                                    400004)
        try:
            json.dumps(patch)
        except (TypeError, ValueError) as exc:
            raise HubOperationError(f"desired patch is not JSON-serialisable: {exc}",
                                    400004) from None
        from azure.iot.hub.models import Twin, TwinProperties  # type: ignore[import-untyped]
        full_id = self._devices.resolve(device_id)
        twin = call_service(f"updating the desired properties of {full_id!r}",
                            registry.update_twin, full_id,
                            Twin(properties=TwinProperties(desired=patch)), "*")
        desired = getattr(getattr(twin, "properties", None), "desired", None) or {}
        version = desired.get("$version")
        if not isinstance(version, int):
            raise RealBackendError("the hub's answer to the twin update of "
                                   f"{full_id!r} has no desired $version")
        return version


def _unanswered(exc: BaseException, seconds: int) -> MethodResponse | None:
    """A device offline (404) or silent (504) is an outcome of the call, as on the
    fake hub, not an error; None for anything else, a missing device (404001)
    included."""
    status, body = response_of(exc) if is_http_error(exc) else (None, None)
    code = error_code(status, body)
    if status not in (404, 504) or code == 404001:
        return None
    if status == 404:
        fallback = "device is not online"
    else:
        fallback = f"device did not answer within {seconds} s"
    return MethodResponse(
        status, {"errorCode": code, "message": error_text(body)[:300] or fallback})
