"""One family of errors: every error the package raises on purpose derives from IoTFailoverError.

Each also keeps the built-in base it had before (ValueError, RuntimeError, ...), so code that caught
those goes on working. Standard library only: every layer may import this module.
"""
from __future__ import annotations

__all__ = [
    "AuthError",
    "FaultNotSupported",
    "HubInternalError",
    "HubOperationError",
    "IoTFailoverError",
    "PacketTooLarge",
    "ProtocolError",
    "ProtocolViolation",
    "RealBackendError",
    "RealHubUnavailable",
    "SettingsError",
]


class IoTFailoverError(Exception):
    """Root of the package's errors."""


class ProtocolError(IoTFailoverError):
    """The bytes received are not valid MQTT 3.1.1."""


class PacketTooLarge(ProtocolError):
    """A packet's announced length is over the decoder's limit."""

    def __init__(self, size: int, limit: int):
        super().__init__(f"packet of {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class AuthError(IoTFailoverError):
    """A credential was rejected. The message never contains the secret itself."""


class ProtocolViolation(IoTFailoverError):
    """The device did something IoT Hub answers by closing the connection."""


class HubOperationError(IoTFailoverError):
    """A service-side call (send_c2d, invoke_method, ...) the hub refuses, with IoT Hub's error code."""

    def __init__(self, message: str, error_code: int):
        super().__init__(message)
        self.error_code = error_code


class HubInternalError(IoTFailoverError, RuntimeError):
    """The hub thread hit an unexpected error; the text carries the hub's own traceback."""


class FaultNotSupported(IoTFailoverError):
    """The backend cannot produce this fault, or one of its parameters (e.g. a blackhole on a real
    hub); the text names what and why."""


class SettingsError(IoTFailoverError, ValueError):
    """A setting has an unusable value; the message names the option."""


class RealHubUnavailable(IoTFailoverError):
    """The real-hub backend cannot start (a missing package or setting); the text says which."""


class RealBackendError(IoTFailoverError):
    """The real-hub backend cannot do what was asked with the credentials it was given."""
