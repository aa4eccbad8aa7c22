"""MQTT 3.1.1 control packets as plain data classes.

Only the wire vocabulary lives here; no packet knows how it reached us.
"""
from dataclasses import dataclass, field

CONNECT = 1
CONNACK = 2
PUBLISH = 3
PUBACK = 4
PUBREC = 5
PUBREL = 6
PUBCOMP = 7
SUBSCRIBE = 8
SUBACK = 9
UNSUBSCRIBE = 10
UNSUBACK = 11
PINGREQ = 12
PINGRESP = 13
DISCONNECT = 14

PACKET_NAMES = {
    CONNECT: "CONNECT", CONNACK: "CONNACK", PUBLISH: "PUBLISH", PUBACK: "PUBACK",
    PUBREC: "PUBREC", PUBREL: "PUBREL", PUBCOMP: "PUBCOMP", SUBSCRIBE: "SUBSCRIBE",
    SUBACK: "SUBACK", UNSUBSCRIBE: "UNSUBSCRIBE", UNSUBACK: "UNSUBACK",
    PINGREQ: "PINGREQ", PINGRESP: "PINGRESP", DISCONNECT: "DISCONNECT",
}

# CONNACK return codes (MQTT 3.1.1 section 3.2.2.3)
CONNACK_ACCEPTED = 0
CONNACK_BAD_PROTOCOL = 1
CONNACK_ID_REJECTED = 2
CONNACK_SERVER_UNAVAILABLE = 3
CONNACK_BAD_CREDENTIALS = 4
CONNACK_NOT_AUTHORIZED = 5

SUBACK_FAILURE = 0x80


@dataclass
class Will:
    topic: str
    message: bytes
    qos: int = 0
    retain: bool = False


@dataclass
class Connect:
    client_id: str
    keep_alive: int = 60
    clean_session: bool = True
    username: str | None = None
    password: bytes | None = None
    will: Will | None = None
    protocol_name: str = "MQTT"
    protocol_level: int = 4
    type = CONNECT


@dataclass
class Connack:
    return_code: int = 0
    session_present: bool = False
    type = CONNACK


@dataclass
class Publish:
    topic: str
    payload: bytes = b""
    qos: int = 0
    packet_id: int | None = None
    dup: bool = False
    retain: bool = False
    type = PUBLISH


@dataclass
class PacketIdOnly:
    packet_id: int


@dataclass
class Puback(PacketIdOnly):
    type = PUBACK


@dataclass
class Pubrec(PacketIdOnly):
    type = PUBREC


@dataclass
class Pubrel(PacketIdOnly):
    type = PUBREL


@dataclass
class Pubcomp(PacketIdOnly):
    type = PUBCOMP


@dataclass
class Unsuback(PacketIdOnly):
    type = UNSUBACK


@dataclass
class Subscribe:
    packet_id: int
    topics: list[tuple[str, int]] = field(default_factory=list)
    type = SUBSCRIBE


@dataclass
class Suback:
    packet_id: int
    return_codes: list[int] = field(default_factory=list)
    type = SUBACK


@dataclass
class Unsubscribe:
    packet_id: int
    topics: list[str] = field(default_factory=list)
    type = UNSUBSCRIBE


@dataclass
class Pingreq:
    type = PINGREQ


@dataclass
class Pingresp:
    type = PINGRESP


@dataclass
class Disconnect:
    type = DISCONNECT
