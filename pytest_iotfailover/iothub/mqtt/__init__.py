"""Sans-IO MQTT 3.1.1: packet data classes, `encode()` and an incremental `Decoder`."""
from .codec import Decoder, PacketTooLarge, ProtocolError, encode, encode_puback
from .packets import *  # noqa: F401,F403 - the packet vocabulary is this package's API
from . import packets

__all__ = ["Decoder", "PacketTooLarge", "ProtocolError", "encode", "encode_puback", "packets"]
__all__ += [n for n in dir(packets) if not n.startswith("_") and n[0].isupper()]
