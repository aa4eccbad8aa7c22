"""Device-side SAS tokens on the wall clock (the hub core in iothub/ never reads a clock)."""
import time

from .iothub.auth import sas_token_for

__all__ = ["make_sas_token"]


def make_sas_token(resource_uri: str, key_b64: str, expiry: float | None = None,
                   ttl: float = 3600, key_name: str | None = None) -> str:
    """A SAS token valid until `expiry` (epoch seconds), or for `ttl` seconds from now."""
    return sas_token_for(resource_uri, key_b64, expiry if expiry is not None else time.time() + ttl, key_name)
