"""Sans-IO MQTT 3.1.1: packet data classes, `encode()` and an incremental `Decoder`."""
from . import packets
from .codec import Decoder, PacketTooLarge, ProtocolError, encode, encode_puback
from .packets import *

__all__ = ["Decoder", "PacketTooLarge", "ProtocolError", "encode", "encode_puback", "packets"]
__all__ += [n for n in dir(packets) if not n.startswith("_") and n[0].isupper()]
