"""Encoding and incremental decoding of MQTT 3.1.1 packets. No I/O.

`encode(packet) -> bytes` and `Decoder().feed(data) -> [packet, ...]`. The decoder keeps
partial packets between calls and raises `ProtocolError` on anything the 3.1.1 spec forbids,
so a server can close a misbehaving connection without guessing.
"""
import struct

from ...errors import PacketTooLarge, ProtocolError
from . import packets as p

_U16 = struct.Struct("!H")
MAX_REMAINING_LENGTH = 268_435_455  # four length bytes, 3.1.1 section 2.2.3


# --------------------------------------------------------------------------- encoding

def encode_remaining_length(n: int) -> bytes:
    if n < 128:
        return bytes((n,))
    if n > MAX_REMAINING_LENGTH:
        raise ValueError(f"packet body of {n} bytes is too large for MQTT")
    out = bytearray()
    while True:
        digit = n % 128
        n //= 128
        if n:
            digit |= 0x80
        out.append(digit)
        if not n:
            return bytes(out)


def _string(s: str) -> bytes:
    raw = s.encode("utf-8")
    if len(raw) > 0xFFFF:
        raise ValueError("MQTT strings are limited to 65535 bytes")
    return _U16.pack(len(raw)) + raw


def _binary(b: bytes) -> bytes:
    if len(b) > 0xFFFF:
        raise ValueError("MQTT binary fields are limited to 65535 bytes")
    return _U16.pack(len(b)) + b


def _frame(first: int, body: bytes) -> bytes:
    return bytes((first,)) + encode_remaining_length(len(body)) + body


# a whole PUBACK in one C call: the first byte, remaining length 2, the packet id
_PUBACK = struct.Struct(">BBH")
_PUBACK_FIRST = p.PUBACK << 4


def encode_puback(packet_id: int) -> bytes:
    """The hot path of a hub: PUBACK without building a packet object."""
    return _PUBACK.pack(_PUBACK_FIRST, 2, packet_id)


def encode(packet) -> bytes:
    t = packet.type
    if t == p.PUBLISH:
        if packet.qos not in (0, 1, 2):
            raise ValueError(f"invalid QoS {packet.qos}")
        first = (p.PUBLISH << 4) | (packet.dup << 3) | (packet.qos << 1) | int(packet.retain)
        body = _string(packet.topic)
        if packet.qos:
            if not packet.packet_id:
                raise ValueError("QoS 1 and 2 publishes need a packet id")
            body += _U16.pack(packet.packet_id)
        return _frame(first, body + bytes(packet.payload))
    if t == p.PUBACK:
        return encode_puback(packet.packet_id)
    if t in (p.PUBREC, p.PUBCOMP, p.UNSUBACK):
        return bytes((t << 4, 2)) + _U16.pack(packet.packet_id)
    if t == p.PUBREL:
        return bytes(((p.PUBREL << 4) | 0x02, 2)) + _U16.pack(packet.packet_id)
    if t == p.CONNACK:
        return bytes((p.CONNACK << 4, 2, int(bool(packet.session_present)), packet.return_code))
    if t == p.CONNECT:
        flags = 0
        if packet.clean_session:
            flags |= 0x02
        payload = _string(packet.client_id)
        if packet.will is not None:
            flags |= 0x04 | (packet.will.qos << 3) | (0x20 if packet.will.retain else 0)
            payload += _string(packet.will.topic) + _binary(packet.will.message)
        if packet.username is not None:
            flags |= 0x80
            payload += _string(packet.username)
        if packet.password is not None:
            if packet.username is None:
                raise ValueError("MQTT 3.1.1 does not allow a password without a user name")
            flags |= 0x40
            payload += _binary(packet.password)
        body = (_string(packet.protocol_name) + bytes((packet.protocol_level, flags))
                + _U16.pack(packet.keep_alive) + payload)
        return _frame(p.CONNECT << 4, body)
    if t == p.SUBSCRIBE:
        if not packet.topics:
            raise ValueError("SUBSCRIBE needs at least one topic filter")
        body = _U16.pack(packet.packet_id)
        for topic, qos in packet.topics:
            body += _string(topic) + bytes((qos,))
        return _frame((p.SUBSCRIBE << 4) | 0x02, body)
    if t == p.SUBACK:
        return _frame(p.SUBACK << 4, _U16.pack(packet.packet_id) + bytes(packet.return_codes))
    if t == p.UNSUBSCRIBE:
        if not packet.topics:
            raise ValueError("UNSUBSCRIBE needs at least one topic filter")
        body = _U16.pack(packet.packet_id) + b"".join(_string(x) for x in packet.topics)
        return _frame((p.UNSUBSCRIBE << 4) | 0x02, body)
    if t in (p.PINGREQ, p.PINGRESP, p.DISCONNECT):
        return bytes((t << 4, 0))
    raise ValueError(f"cannot encode {packet!r}")


# --------------------------------------------------------------------------- decoding

class _Reader:
    __slots__ = ("data", "end", "name", "pos")

    def __init__(self, data, start, end, name):
        self.data = data
        self.pos = start
        self.end = end
        self.name = name

    def need(self, n, what):
        if self.pos + n > self.end:
            raise ProtocolError(f"{self.name}: truncated {what}")

    def byte(self, what):
        self.need(1, what)
        b = self.data[self.pos]
        self.pos += 1
        return b

    def u16(self, what):
        self.need(2, what)
        v = (self.data[self.pos] << 8) | self.data[self.pos + 1]
        self.pos += 2
        return v

    def binary(self, what):
        n = self.u16(what + " length")
        self.need(n, what)
        v = bytes(self.data[self.pos:self.pos + n])
        self.pos += n
        return v

    def string(self, what):
        raw = self.binary(what)
        try:
            s = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(f"{self.name}: {what} is not valid UTF-8") from None
        if "\x00" in s:
            raise ProtocolError(f"{self.name}: {what} contains U+0000")
        return s

    def rest(self):
        v = bytes(self.data[self.pos:self.end])
        self.pos = self.end
        return v

    def done(self):
        if self.pos != self.end:
            raise ProtocolError(f"{self.name}: {self.end - self.pos} unexpected trailing bytes")


_FIXED_FLAGS = {
    p.CONNECT: 0, p.CONNACK: 0, p.PUBACK: 0, p.PUBREC: 0, p.PUBREL: 2, p.PUBCOMP: 0,
    p.SUBSCRIBE: 2, p.SUBACK: 0, p.UNSUBSCRIBE: 2, p.UNSUBACK: 0, p.PINGREQ: 0,
    p.PINGRESP: 0, p.DISCONNECT: 0,
}


def _decode_publish(first, r):
    qos = (first >> 1) & 0x03
    dup = bool(first & 0x08)
    if qos == 3:
        raise ProtocolError("PUBLISH: QoS 3 is reserved")
    if qos == 0 and dup:
        raise ProtocolError("PUBLISH: DUP must be 0 for QoS 0")
    topic = r.string("topic")
    if not topic:
        raise ProtocolError("PUBLISH: empty topic")
    if "+" in topic or "#" in topic:
        raise ProtocolError("PUBLISH: wildcard in topic name")
    packet_id = None
    if qos:
        packet_id = r.u16("packet id")
        if packet_id == 0:
            raise ProtocolError("PUBLISH: packet id 0")
    return p.Publish(topic, r.rest(), qos, packet_id, dup, bool(first & 0x01))


def _decode_connect(first, r):
    name = r.string("protocol name")
    level = r.byte("protocol level")
    flags = r.byte("connect flags")
    if flags & 0x01:
        raise ProtocolError("CONNECT: reserved flag set")
    keep_alive = r.u16("keep alive")
    client_id = r.string("client id")
    will = None
    will_flag = bool(flags & 0x04)
    will_qos = (flags >> 3) & 0x03
    if will_flag:
        if will_qos == 3:
            raise ProtocolError("CONNECT: will QoS 3")
        will = p.Will(r.string("will topic"), r.binary("will message"), will_qos, bool(flags & 0x20))
    elif will_qos or flags & 0x20:
        raise ProtocolError("CONNECT: will QoS/retain without will flag")
    username = r.string("user name") if flags & 0x80 else None
    password = None
    if flags & 0x40:
        if username is None:
            raise ProtocolError("CONNECT: password without user name")
        password = r.binary("password")
    return p.Connect(client_id, keep_alive, bool(flags & 0x02), username, password, will, name, level)


def _decode_subscribe(first, r):
    packet_id = r.u16("packet id")
    if packet_id == 0:
        raise ProtocolError("SUBSCRIBE: packet id 0")
    topics = []
    while r.pos < r.end:
        topic = r.string("topic filter")
        if not topic:
            raise ProtocolError("SUBSCRIBE: empty topic filter")
        qos = r.byte("requested QoS")
        if qos > 2:  # reserved bits set, or QoS 3
            raise ProtocolError(f"SUBSCRIBE: invalid requested QoS byte {qos:#x}")
        topics.append((topic, qos))
    if not topics:
        raise ProtocolError("SUBSCRIBE: no topic filters")
    return p.Subscribe(packet_id, topics)


def _decode_unsubscribe(first, r):
    packet_id = r.u16("packet id")
    if packet_id == 0:
        raise ProtocolError("UNSUBSCRIBE: packet id 0")
    topics = []
    while r.pos < r.end:
        topic = r.string("topic filter")
        if not topic:
            raise ProtocolError("UNSUBSCRIBE: empty topic filter")
        topics.append(topic)
    if not topics:
        raise ProtocolError("UNSUBSCRIBE: no topic filters")
    return p.Unsubscribe(packet_id, topics)


def _decode_connack(first, r):
    flags = r.byte("acknowledge flags")
    if flags & 0xFE:
        raise ProtocolError("CONNACK: reserved flags set")
    return p.Connack(r.byte("return code"), bool(flags & 0x01))


def _decode_suback(first, r):
    packet_id = r.u16("packet id")
    codes = list(r.rest())
    if not codes:
        raise ProtocolError("SUBACK: no return codes")
    for c in codes:
        if c not in (0, 1, 2, p.SUBACK_FAILURE):
            raise ProtocolError(f"SUBACK: invalid return code {c:#x}")
    return p.Suback(packet_id, codes)


def _id_only(cls):
    def decode(first, r):
        return cls(r.u16("packet id"))
    return decode


def _empty(cls):
    def decode(first, r):
        return cls()
    return decode


_DECODERS = {
    p.CONNECT: _decode_connect,
    p.CONNACK: _decode_connack,
    p.PUBLISH: _decode_publish,
    p.PUBACK: _id_only(p.Puback),
    p.PUBREC: _id_only(p.Pubrec),
    p.PUBREL: _id_only(p.Pubrel),
    p.PUBCOMP: _id_only(p.Pubcomp),
    p.SUBSCRIBE: _decode_subscribe,
    p.SUBACK: _decode_suback,
    p.UNSUBSCRIBE: _decode_unsubscribe,
    p.UNSUBACK: _id_only(p.Unsuback),
    p.PINGREQ: _empty(p.Pingreq),
    p.PINGRESP: _empty(p.Pingresp),
    p.DISCONNECT: _empty(p.Disconnect),
}


class Decoder:
    """Incremental decoder: feed bytes as they arrive, get whole packets back.

    After a ProtocolError the decoder is poisoned: the stream cannot be re-synchronised,
    so every later feed raises the same error. When good packets precede the bad bytes in one
    feed, they are returned and `error` is set; callers must check it.
    """

    def __init__(self, max_packet_size: int | None = None, first_packet_max: int | None = None):
        """`first_packet_max`, when given, is a tighter limit for the first packet only: a server
        can keep what an unauthenticated peer makes it buffer small (the first packet must be
        CONNECT) while still taking large packets once the peer has authenticated."""
        self.max_packet_size = max_packet_size
        self.first_packet_max = first_packet_max
        self._first = first_packet_max is not None
        self._buf = bytearray()
        self._error: ProtocolError | None = None

    @property
    def error(self) -> ProtocolError | None:
        """The error that poisoned this decoder, if any (set even when feed() returned packets)."""
        return self._error

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data) -> list[object]:
        if self._error is not None:
            raise self._error
        buf: bytes | bytearray = self._buf
        if buf or not isinstance(data, bytes):
            buf += data
        else:
            # nothing held back: decode straight from the caller's bytes, keep only a partial tail
            buf = data
        out = []
        pos = 0
        n = len(buf)
        try:
            while pos < n:
                first = buf[pos]
                # variable-length remaining length
                length = 0
                mult = 1
                i = pos + 1
                while True:
                    if i >= n:
                        break
                    b = buf[i]
                    length += (b & 0x7F) * mult
                    i += 1
                    if not b & 0x80:
                        break
                    mult *= 128
                    if i - pos > 4:
                        raise ProtocolError("malformed remaining length (more than four bytes)")
                else:  # pragma: no cover - loop always breaks
                    pass
                if i >= n and (i == pos + 1 or buf[i - 1] & 0x80):
                    break  # length bytes incomplete
                limit = self.first_packet_max if self._first else self.max_packet_size
                if limit is not None and length > limit:
                    raise PacketTooLarge(length, limit)
                end = i + length
                if end > n:
                    break
                out.append(self._decode_one(first, buf, i, end))
                self._first = False
                pos = end
        except ProtocolError as exc:
            self._error = exc
            del self._buf[:]
            if out:
                # the packets before the garbage are real: hand them over, raise on the next feed
                return out
            raise
        if buf is not self._buf:
            if pos < n:
                self._buf += buf[pos:]
        elif pos:
            del buf[:pos]
        return out

    @staticmethod
    def _decode_one(first, buf, start, end):
        ptype = first >> 4
        if ptype == 3:  # PUBLISH: the hot path, inlined; anything unusual takes the general route
            qos = (first >> 1) & 0x03
            tend = start + 2 + ((buf[start] << 8) | buf[start + 1]) if end - start >= 2 else end + 1
            body = tend + (2 if qos else 0)
            if qos != 3 and (qos or not first & 0x08) and start < tend - 2 and body <= end:
                try:
                    topic = buf[start + 2:tend].decode("utf-8")
                except UnicodeDecodeError:
                    topic = None
                if topic is not None and "+" not in topic and "#" not in topic and "\x00" not in topic:
                    packet_id = ((buf[tend] << 8) | buf[tend + 1]) if qos else None
                    if packet_id != 0:
                        return p.Publish(topic, bytes(buf[body:end]), qos, packet_id,
                                         bool(first & 0x08), bool(first & 0x01))
        decoder = _DECODERS.get(ptype)
        if decoder is None:
            raise ProtocolError(f"reserved packet type {ptype}")
        name = p.PACKET_NAMES[ptype]
        if ptype != p.PUBLISH and (first & 0x0F) != _FIXED_FLAGS[ptype]:
            raise ProtocolError(f"{name}: invalid fixed-header flags {first & 0x0F:#x}")
        r = _Reader(buf, start, end, name)
        packet = decoder(first, r)
        r.done()
        return packet
