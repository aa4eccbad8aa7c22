"""Property and example tests for the sans-IO MQTT 3.1.1 codec (pytest_iotfailover.mqtt).

The malformed-packet fixtures are built by hand with `_frame` below (an independent
remaining-length encoder), so they do not depend on the encoder under test.
"""
import itertools
import struct

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pytest_iotfailover.iothub.mqtt import (
    Decoder,
    PacketTooLarge,
    ProtocolError,
    encode,
    encode_puback,
)
from pytest_iotfailover.iothub.mqtt import (
    packets as p,
)

SETTINGS = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

MAX_REMAINING_LENGTH = 268_435_455


# ----------------------------------------------------------------------------- helpers

def _rl(n: int) -> bytes:
    """Remaining length, written straight from the table in MQTT 3.1.1 section 2.2.3."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _frame(first: int, body: bytes = b"") -> bytes:
    return bytes((first,)) + _rl(len(body)) + body


def _s(text) -> bytes:
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return struct.pack("!H", len(raw)) + raw


def _u16(n: int) -> bytes:
    return struct.pack("!H", n)


def _connect_body(flags: int, payload: bytes = _s("dev")) -> bytes:
    return _s("MQTT") + bytes((4, flags)) + _u16(60) + payload



# ----------------------------------------------------------------------------- strategies

# Valid MQTT UTF-8 strings: no surrogates (not encodable) and no U+0000 (forbidden).
_chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
mqtt_text = st.text(_chars, max_size=24)
topic_names = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00+#"),
                      min_size=1, max_size=24)
topic_filters = st.text(_chars, min_size=1, max_size=24)
packet_ids = st.integers(1, 0xFFFF)
qos_values = st.integers(0, 2)
small_bytes = st.binary(max_size=64)

wills = st.builds(p.Will, topic=topic_names, message=small_bytes, qos=qos_values,
                  retain=st.booleans())


@st.composite
def connects(draw, protocol=st.sampled_from([("MQTT", 4), ("MQIsdp", 3)])):
    protocol_name, protocol_level = draw(protocol)
    username = draw(st.none() | mqtt_text)
    password = None if username is None else draw(st.none() | small_bytes)
    return p.Connect(
        client_id=draw(mqtt_text),
        keep_alive=draw(st.integers(0, 0xFFFF)),
        clean_session=draw(st.booleans()),
        username=username,
        password=password,
        will=draw(st.none() | wills),
        protocol_name=protocol_name,
        protocol_level=protocol_level,
    )


@st.composite
def publishes(draw, payload=st.binary(max_size=300)):
    qos = draw(qos_values)
    return p.Publish(
        topic=draw(topic_names),
        payload=draw(payload),
        qos=qos,
        packet_id=draw(packet_ids) if qos else None,
        dup=draw(st.booleans()) if qos else False,
        retain=draw(st.booleans()),
    )


connacks = st.builds(p.Connack, return_code=st.integers(0, 5), session_present=st.booleans())
id_only = st.one_of(*(st.builds(cls, packet_ids)
                      for cls in (p.Puback, p.Pubrec, p.Pubrel, p.Pubcomp, p.Unsuback)))
subscribes = st.builds(p.Subscribe, packet_ids,
                       st.lists(st.tuples(topic_filters, qos_values), min_size=1, max_size=5))
subacks = st.builds(p.Suback, packet_ids,
                    st.lists(st.sampled_from([0, 1, 2, p.SUBACK_FAILURE]), min_size=1, max_size=8))
unsubscribes = st.builds(p.Unsubscribe, packet_ids, st.lists(topic_filters, min_size=1, max_size=5))
empties = st.sampled_from([p.Pingreq(), p.Pingresp(), p.Disconnect()])

any_packet = st.one_of(connects(), connacks, publishes(), id_only, subscribes, subacks,
                       unsubscribes, empties)


@st.composite
def split_points(draw, data: bytes):
    cuts = draw(st.lists(st.integers(0, len(data)), max_size=8))
    bounds = sorted(set([0, len(data)] + cuts))
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# ----------------------------------------------------------------------------- 1. round trip

@SETTINGS
@given(any_packet)
def test_round_trip_whole(packet):
    data = encode(packet)
    dec = Decoder()
    assert dec.feed(data) == [packet]
    assert dec.buffered == 0
    # and the bytes re-encode identically (canonical encoding)
    assert encode(dec.feed(data)[0]) == data


@SETTINGS
@given(any_packet)
def test_round_trip_byte_by_byte(packet):
    data = encode(packet)
    dec = Decoder()
    got = []
    for i in range(len(data)):
        got += dec.feed(data[i:i + 1])
        if i < len(data) - 1:
            assert got == []
    assert got == [packet]
    assert dec.buffered == 0


@SETTINGS
@given(st.data())
def test_round_trip_random_splits(data):
    packet = data.draw(any_packet)
    chunks = data.draw(split_points(encode(packet)))
    dec = Decoder()
    got = []
    for chunk in chunks:
        got += dec.feed(chunk)
    assert got == [packet]
    assert dec.buffered == 0


@SETTINGS
@given(st.lists(any_packet, min_size=1, max_size=8))
def test_several_packets_in_one_feed(packets):
    stream = b"".join(encode(x) for x in packets)
    assert Decoder().feed(stream) == packets


@SETTINGS
@given(st.data())
def test_several_packets_random_splits(data):
    packets = data.draw(st.lists(any_packet, min_size=1, max_size=6))
    stream = b"".join(encode(x) for x in packets)
    dec = Decoder()
    got = []
    for chunk in data.draw(split_points(stream)):
        got += dec.feed(chunk)
    assert got == packets
    assert dec.buffered == 0


@pytest.mark.parametrize("packet", [
    p.Connect("dev"),
    p.Connect("dev", username="hub/dev/?api-version=2021-04-12", password=b"SharedAccessSignature sr=x"),
    p.Connect("dev", username="u"),  # user name without password is legal
    p.Connect("", clean_session=True),
    p.Connect("dev", clean_session=False, keep_alive=0,
              will=p.Will("devices/dev/messages/events/", b"bye", qos=1, retain=True)),
    p.Connect("dev", username="u", password=b"", will=p.Will("t", b"", qos=2)),
    p.Connack(), p.Connack(p.CONNACK_NOT_AUTHORIZED), p.Connack(0, session_present=True),
    p.Publish("a"), p.Publish("a/b", b"x" * 200, qos=1, packet_id=7, dup=True, retain=True),
    p.Publish("a", qos=2, packet_id=0xFFFF, retain=True),
    p.Publish("ü/€/𝄞", b"\x00\xff"),
    p.Puback(1), p.Pubrec(2), p.Pubrel(3), p.Pubcomp(4), p.Unsuback(5),
    p.Subscribe(1, [("devices/dev/messages/devicebound/#", 1), ("$iothub/twin/res/#", 0),
                    ("a/+/c", 2)]),
    p.Suback(1, [0, 1, 2, 0x80]),
    p.Unsubscribe(9, ["a/#", "b"]),
    p.Pingreq(), p.Pingresp(), p.Disconnect(),
], ids=repr)
def test_round_trip_examples(packet):
    data = encode(packet)
    assert Decoder().feed(data) == [packet]


def test_known_bytes():
    """Hand-written wire images, so the round trip is not only self-consistent."""
    assert encode(p.Pingreq()) == b"\xc0\x00"
    assert encode(p.Pingresp()) == b"\xd0\x00"
    assert encode(p.Disconnect()) == b"\xe0\x00"
    assert encode(p.Puback(0x1234)) == encode_puback(0x1234) == b"\x40\x02\x12\x34"
    assert encode(p.Pubrec(1)) == b"\x50\x02\x00\x01"
    assert encode(p.Pubrel(1)) == b"\x62\x02\x00\x01"
    assert encode(p.Pubcomp(1)) == b"\x70\x02\x00\x01"
    assert encode(p.Unsuback(1)) == b"\xb0\x02\x00\x01"
    assert encode(p.Connack(0, True)) == b"\x20\x02\x01\x00"
    assert encode(p.Connack(5)) == b"\x20\x02\x00\x05"
    assert encode(p.Suback(10, [1, 0x80])) == b"\x90\x04\x00\x0a\x01\x80"
    assert encode(p.Subscribe(10, [("a/b", 1)])) == b"\x82\x08\x00\x0a\x00\x03a/b\x01"
    assert encode(p.Unsubscribe(10, ["a/b"])) == b"\xa2\x07\x00\x0a\x00\x03a/b"
    assert encode(p.Publish("a/b", b"hi", qos=1, packet_id=10, retain=True)) == \
        b"\x33\x09\x00\x03a/b\x00\x0ahi"
    assert encode(p.Publish("a", b"", qos=2, packet_id=1, dup=True)) == b"\x3c\x05\x00\x01a\x00\x01"
    assert encode(p.Connect("c", keep_alive=60, username="u", password=b"pw",
                            will=p.Will("w", b"m", qos=1, retain=True))) == (
        b"\x10\x1a\x00\x04MQTT\x04\xee\x00\x3c"
        b"\x00\x01c\x00\x01w\x00\x01m\x00\x01u\x00\x02pw")


@pytest.mark.parametrize("size, length_bytes", [
    (0, b"\x00"), (127, b"\x7f"), (128, b"\x80\x01"), (16_383, b"\xff\x7f"),
    (16_384, b"\x80\x80\x01"), (2_097_151, b"\xff\xff\x7f"), (2_097_152, b"\x80\x80\x80\x01"),
])
def test_remaining_length_boundaries(size, length_bytes):
    # PUBLISH body = 2-byte topic length + 1-byte topic + payload
    packet = p.Publish("t", b"\xab" * (size - 3)) if size >= 3 else None
    if packet is not None:
        data = encode(packet)
        assert data[1:1 + len(length_bytes)] == length_bytes
        assert len(data) == 1 + len(length_bytes) + size
        assert Decoder().feed(data) == [packet]
    # decoding the length alone (PacketTooLarge reports the decoded length)
    if size:
        with pytest.raises(PacketTooLarge) as exc:
            Decoder(max_packet_size=size - 1).feed(b"\x30" + length_bytes)
        assert exc.value.size == size


@SETTINGS
@given(st.integers(1, MAX_REMAINING_LENGTH))
def test_remaining_length_decoding(n):
    header = b"\x30" + _rl(n)
    with pytest.raises(PacketTooLarge) as exc:
        Decoder(max_packet_size=n - 1).feed(header)
    assert (exc.value.size, exc.value.limit) == (n, n - 1)
    dec = Decoder(max_packet_size=n)  # exactly at the limit: accepted, waits for the body
    assert dec.feed(header) == []
    assert dec.buffered == len(header)


def test_max_remaining_length_is_accepted():
    dec = Decoder()
    assert dec.feed(b"\x30\xff\xff\xff\x7f") == []  # 268,435,455: waits for the body


# ----------------------------------------------------------------------------- 2. truncation

@SETTINGS
@given(any_packet)
def test_every_strict_prefix_waits(packet):
    data = encode(packet)
    for cut in range(len(data)):
        dec = Decoder()
        assert dec.feed(data[:cut]) == []
        assert dec.buffered == cut
        assert dec.feed(data[cut:]) == [packet]


@SETTINGS
@given(st.lists(any_packet, min_size=1, max_size=4), any_packet, st.data())
def test_prefix_after_complete_packets(complete, partial, data):
    tail = encode(partial)
    cut = data.draw(st.integers(0, len(tail) - 1))
    dec = Decoder()
    assert dec.feed(b"".join(encode(x) for x in complete) + tail[:cut]) == complete
    assert dec.buffered == cut
    assert dec.feed(tail[cut:]) == [partial]


def test_empty_feed():
    dec = Decoder()
    assert dec.feed(b"") == []
    assert dec.feed(b"\xc0") == []
    assert dec.feed(b"") == []
    assert dec.feed(b"\x00") == [p.Pingreq()]


def test_accepts_bytearray_and_memoryview():
    data = encode(p.Publish("a/b", b"xyz", qos=1, packet_id=3))
    assert Decoder().feed(bytearray(data)) == Decoder().feed(memoryview(data)) == \
        [p.Publish("a/b", b"xyz", qos=1, packet_id=3)]


# ----------------------------------------------------------------------------- 3. garbage

def _feed_checked(chunks, **kw):
    """Feed chunks; only ProtocolError may escape, and afterwards the decoder is poisoned."""
    dec = Decoder(**kw)
    got = []
    for chunk in chunks:
        try:
            got += dec.feed(chunk)
            if dec.error is not None:
                raise dec.error
        except ProtocolError as exc:
            assert str(exc) and dec.error is exc
            for again in (b"", b"\xc0\x00", chunk):
                with pytest.raises(ProtocolError):
                    dec.feed(again)
            return got, exc
    return got, None


@SETTINGS
@given(st.binary(max_size=200), st.none() | st.integers(0, 300))
def test_random_bytes_only_protocol_error(data, limit):
    _feed_checked([data], max_packet_size=limit)


@SETTINGS
@given(st.data())
def test_random_bytes_in_chunks_only_protocol_error(data):
    chunks = data.draw(st.lists(st.binary(max_size=40), max_size=8))
    _feed_checked(chunks)


@st.composite
def mutated_packets(draw):
    """A valid packet stream with a few bytes overwritten/inserted/deleted: reaches deep
    into the body parsers, which random bytes rarely do."""
    data = bytearray(b"".join(encode(x) for x in draw(st.lists(any_packet, min_size=1,
                                                                  max_size=3))))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["set", "insert", "delete", "flip"]))
        i = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "set" and data:
            data[i] = draw(st.integers(0, 255))
        elif op == "flip" and data:
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=3))
        elif op == "delete" and data:
            del data[i]
    return bytes(data)


@SETTINGS
@given(mutated_packets(), st.data())
def test_mutated_packets_only_protocol_error(blob, data):
    _feed_checked(data.draw(split_points(blob)))


@SETTINGS
@given(mutated_packets())
def test_split_feeding_agrees_with_whole_feeding(blob):
    """Whatever the bytes, byte-by-byte feeding gives the same packets/error as one feed."""
    whole, whole_err = _feed_checked([blob])
    bytewise, byte_err = _feed_checked([blob[i:i + 1] for i in range(len(blob))])
    if whole_err is None:
        assert byte_err is None and bytewise == whole
    else:
        # packets before the error are delivered either way
        assert byte_err is not None and str(byte_err) == str(whole_err)
        assert bytewise == whole


def test_poisoned_decoder_keeps_raising():
    dec = Decoder()
    with pytest.raises(ProtocolError) as first:
        dec.feed(b"\x00\x00")
    assert dec.buffered == 0
    for data in (b"", encode(p.Pingreq()), b"\x00\x00"):
        with pytest.raises(ProtocolError) as again:
            dec.feed(data)
        assert str(again.value) == str(first.value)


# ----------------------------------------------------------------------------- 4. malformed

MALFORMED = {
    "reserved type 0": (b"\x00\x00", r"reserved packet type 0"),
    "reserved type 15": (b"\xf0\x00", r"reserved packet type 15"),
    "SUBSCRIBE flags 0": (_frame(0x80, _u16(1) + _s("a") + b"\x00"),
                          r"SUBSCRIBE: invalid fixed-header flags 0x0"),
    "UNSUBSCRIBE flags 0": (_frame(0xA0, _u16(1) + _s("a")), r"UNSUBSCRIBE: invalid fixed-header"),
    "PUBREL flags 0": (b"\x60\x02\x00\x01", r"PUBREL: invalid fixed-header flags"),
    "PUBACK flags 2": (b"\x42\x02\x00\x01", r"PUBACK: invalid fixed-header flags 0x2"),
    "CONNECT flags": (_frame(0x11, _connect_body(0x02)), r"CONNECT: invalid fixed-header"),
    "PINGREQ flags": (b"\xc8\x00", r"PINGREQ: invalid fixed-header flags 0x8"),
    "5-byte remaining length": (b"\x30\xff\xff\xff\xff\x01", r"more than four bytes"),
    "PUBLISH QoS 3": (_frame(0x36, _s("a") + _u16(1)), r"PUBLISH: QoS 3"),
    "PUBLISH QoS 0 with DUP": (_frame(0x38, _s("a")), r"PUBLISH: DUP must be 0 for QoS 0"),
    "PUBLISH + in topic": (_frame(0x30, _s("a/+/c")), r"PUBLISH: wildcard"),
    "PUBLISH # in topic": (_frame(0x30, _s("a/#")), r"PUBLISH: wildcard"),
    "PUBLISH empty topic": (_frame(0x30, _s("")), r"PUBLISH: empty topic"),
    "PUBLISH packet id 0": (_frame(0x32, _s("a") + _u16(0)), r"PUBLISH: packet id 0"),
    "PUBLISH QoS 2 packet id 0": (_frame(0x34, _s("a") + _u16(0)), r"PUBLISH: packet id 0"),
    "PUBLISH missing packet id": (_frame(0x32, _s("a") + b"\x00"), r"PUBLISH: truncated packet id"),
    "PUBLISH topic truncated": (_frame(0x30, b"\x00\x05ab"), r"PUBLISH: truncated topic"),
    "PUBLISH topic length truncated": (_frame(0x30, b"\x00"), r"PUBLISH: truncated topic length"),
    "PUBLISH invalid UTF-8": (_frame(0x30, _s(b"\xff\xfe")), r"PUBLISH: topic is not valid UTF-8"),
    "PUBLISH overlong UTF-8": (_frame(0x30, _s(b"a\xc0\xafb")), r"topic is not valid UTF-8"),
    "PUBLISH UTF-16 surrogate": (_frame(0x30, _s(b"\xed\xa0\x80")), r"topic is not valid UTF-8"),
    "PUBLISH U+0000 in topic": (_frame(0x30, _s(b"a\x00b")), r"PUBLISH: topic contains U\+0000"),
    "CONNECT reserved flag": (_frame(0x10, _connect_body(0x03)), r"CONNECT: reserved flag set"),
    "CONNECT password without username": (
        _frame(0x10, _connect_body(0x42, _s("dev") + _s(b"pw"))),
        r"CONNECT: password without user name"),
    "CONNECT will QoS 3": (_frame(0x10, _connect_body(0x1E, _s("dev") + _s("w") + _s(b"m"))),
                           r"CONNECT: will QoS 3"),
    "CONNECT will QoS without will": (_frame(0x10, _connect_body(0x0A)),
                                      r"CONNECT: will QoS/retain without will flag"),
    "CONNECT will retain without will": (_frame(0x10, _connect_body(0x22)),
                                         r"CONNECT: will QoS/retain without will flag"),
    "CONNECT invalid UTF-8 client id": (_frame(0x10, _connect_body(0x02, _s(b"\x80"))),
                                        r"CONNECT: client id is not valid UTF-8"),
    "CONNECT truncated will": (_frame(0x10, _connect_body(0x06, _s("dev") + _s("w"))),
                               r"CONNECT: truncated will message"),
    "CONNECT trailing bytes": (_frame(0x10, _connect_body(0x02) + b"x"),
                               r"CONNECT: 1 unexpected trailing bytes"),
    "CONNACK reserved flags": (b"\x20\x02\x02\x00", r"CONNACK: reserved flags"),
    "CONNACK truncated": (b"\x20\x01\x00", r"CONNACK: truncated return code"),
    "SUBSCRIBE no topics": (_frame(0x82, _u16(1)), r"SUBSCRIBE: no topic filters"),
    "SUBSCRIBE QoS 3": (_frame(0x82, _u16(1) + _s("a") + b"\x03"),
                        r"SUBSCRIBE: invalid requested QoS byte 0x3"),
    "SUBSCRIBE reserved QoS bits": (_frame(0x82, _u16(1) + _s("a") + b"\x41"),
                                    r"SUBSCRIBE: invalid requested QoS byte 0x41"),
    "SUBSCRIBE missing QoS": (_frame(0x82, _u16(1) + _s("a")), r"SUBSCRIBE: truncated requested QoS"),
    "SUBSCRIBE packet id 0": (_frame(0x82, _u16(0) + _s("a") + b"\x01"), r"SUBSCRIBE: packet id 0"),
    "SUBSCRIBE empty filter": (_frame(0x82, _u16(1) + _s("") + b"\x01"),
                               r"SUBSCRIBE: empty topic filter"),
    "UNSUBSCRIBE no topics": (_frame(0xA2, _u16(1)), r"UNSUBSCRIBE: no topic filters"),
    "UNSUBSCRIBE packet id 0": (_frame(0xA2, _u16(0) + _s("a")), r"UNSUBSCRIBE: packet id 0"),
    "UNSUBSCRIBE empty filter": (_frame(0xA2, _u16(1) + _s("")), r"UNSUBSCRIBE: empty topic filter"),
    "SUBACK no return codes": (_frame(0x90, _u16(1)), r"SUBACK: no return codes"),
    "SUBACK invalid return code": (_frame(0x90, _u16(1) + b"\x03"), r"SUBACK: invalid return code 0x3"),
    "PUBACK trailing bytes": (b"\x40\x03\x00\x01\x00", r"PUBACK: 1 unexpected trailing bytes"),
    "PUBACK truncated": (b"\x40\x01\x00", r"PUBACK: truncated packet id"),
    "PUBCOMP trailing bytes": (b"\x70\x04\x00\x01\x00\x00", r"PUBCOMP: 2 unexpected trailing"),
    "PINGREQ with body": (b"\xc0\x01\x00", r"PINGREQ: 1 unexpected trailing bytes"),
    "DISCONNECT with body": (b"\xe0\x01\x00", r"DISCONNECT: 1 unexpected trailing bytes"),
}


@pytest.mark.parametrize("data, message", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed(data, message):
    dec = Decoder()
    with pytest.raises(ProtocolError, match=message):
        dec.feed(data)
    with pytest.raises(ProtocolError, match=message):  # poisoned
        dec.feed(encode(p.Pingreq()))


@pytest.mark.parametrize("data, message", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_after_valid_packet_byte_by_byte(data, message):
    """The error is found however the bytes arrive, after good traffic on the stream."""
    dec = Decoder()
    good = encode(p.Publish("a", b"x", qos=1, packet_id=1))
    assert dec.feed(good) == [p.Publish("a", b"x", qos=1, packet_id=1)]
    with pytest.raises(ProtocolError, match=message):
        for i in range(len(data)):
            dec.feed(data[i:i + 1])


def test_five_byte_length_detected_before_fifth_byte():
    dec = Decoder()
    assert dec.feed(b"\x30\xff\xff\xff") == []
    with pytest.raises(ProtocolError, match="more than four bytes"):
        dec.feed(b"\xff")


def test_valid_packets_before_error_in_same_feed():
    """Packets before the garbage are returned; the error is kept and raised by the next feed."""
    dec = Decoder()
    assert dec.feed(encode(p.Pingreq()) + b"\x00\x00") == [p.Pingreq()]
    assert isinstance(dec.error, ProtocolError) and "reserved packet type 0" in str(dec.error)
    with pytest.raises(ProtocolError, match="reserved packet type 0"):
        dec.feed(b"")


# ----------------------------------------------------------------------------- 5. size limit

def test_packet_too_large_is_protocol_error():
    assert issubclass(PacketTooLarge, ProtocolError)


@SETTINGS
@given(st.integers(0, 100_000), st.integers(1, 100_000), st.data())
def test_packet_too_large_before_body(limit, excess, data):
    size = limit + excess
    first = data.draw(st.sampled_from([0x30, 0x32, 0x10, 0x82, 0x40]))
    header = bytes((first,)) + _rl(size)
    dec = Decoder(max_packet_size=limit)
    # nothing is raised while the length field is still incomplete
    for i in range(len(header) - 1):
        assert dec.feed(header[i:i + 1]) == []
    with pytest.raises(PacketTooLarge) as exc:
        dec.feed(header[-1:])  # the last length byte: no body byte has arrived
    assert exc.value.size == size and exc.value.limit == limit
    assert str(size) in str(exc.value) and str(limit) in str(exc.value)
    assert dec.buffered == 0  # nothing retained for an attacker's 256 MB announcement
    with pytest.raises(ProtocolError):
        dec.feed(b"\x00" * 10)


@SETTINGS
@given(any_packet)
def test_packet_at_limit_is_accepted(packet):
    data = encode(packet)
    n = 1
    while data[n] & 0x80:  # count the remaining-length bytes
        n += 1
    body = len(data) - 1 - n
    assert data[1:1 + n] == _rl(body)
    assert Decoder(max_packet_size=body).feed(data) == [packet]
    if body:
        with pytest.raises(PacketTooLarge):
            Decoder(max_packet_size=body - 1).feed(data)


def test_packet_too_large_in_the_middle_of_a_stream():
    dec = Decoder(max_packet_size=10)
    ok = encode(p.Publish("a", b"12345"))
    assert dec.feed(ok) == [p.Publish("a", b"12345")]
    with pytest.raises(PacketTooLarge):
        dec.feed(b"\x30\x0b")


# ----------------------------------------------------------------------------- encoder errors

@pytest.mark.parametrize("packet", [
    p.Publish("a", qos=3, packet_id=1),
    p.Publish("a", qos=1),
    p.Publish("a", qos=2, packet_id=0),
    p.Connect("dev", password=b"pw"),
    p.Subscribe(1, []),
    p.Unsubscribe(1, []),
    p.Publish("a" * 0x10000),
    p.Connect("dev", username="u", password=b"x" * 0x10000),
], ids=repr)
def test_encode_rejects_invalid(packet):
    with pytest.raises(ValueError):
        encode(packet)


# ----------------------------------------------------------------------------- 6. paho-mqtt

mqtt_client = pytest.importorskip("paho.mqtt.client")


class _FakeSock:
    def __init__(self, data=b""):
        self.data = bytearray(data)

    def recv(self, n):
        if not self.data:
            raise BlockingIOError
        out = bytes(self.data[:n])
        del self.data[:n]
        return out

    def close(self):
        pass

    def setblocking(self, flag):
        pass


def _paho(client_id="dev", clean_session=True):
    """A paho 3.1.1 client whose outgoing packets are captured instead of sent."""
    client = mqtt_client.Client(client_id=client_id, clean_session=clean_session,
                                protocol=mqtt_client.MQTTv311)
    sent = []

    def capture(command, packet, mid, qos, info=None):
        sent.append(bytes(packet))
        return mqtt_client.MQTT_ERR_SUCCESS

    client._packet_queue = capture
    client._sock = _FakeSock()
    return client, sent


def _paho_receive(client, data):
    client._sock = _FakeSock(data)
    while client._sock.data:
        rc = client._packet_read()
        assert rc == mqtt_client.MQTT_ERR_SUCCESS, rc


@FEW
@given(connects(protocol=st.just(("MQTT", 4))))
def test_paho_connect_bytes(packet):
    assume(packet.clean_session or packet.client_id)  # paho refuses otherwise
    client, sent = _paho(packet.client_id, packet.clean_session)
    if packet.username is not None:
        client.username_pw_set(packet.username, packet.password)
    if packet.will is not None:
        client.will_set(packet.will.topic, packet.will.message, packet.will.qos,
                        packet.will.retain)
    client._send_connect(packet.keep_alive)
    assert sent == [encode(packet)]
    assert Decoder().feed(sent[0]) == [packet]


@FEW
@given(publishes())
def test_paho_publish_bytes(packet):
    client, sent = _paho()
    client._send_publish(packet.packet_id or 0, packet.topic.encode("utf-8"), packet.payload,
                         packet.qos, packet.retain, packet.dup)
    assert sent == [encode(packet)]
    assert Decoder().feed(sent[0]) == [packet]


@FEW
@given(subscribes, unsubscribes)
def test_paho_subscribe_unsubscribe_bytes(sub, unsub):
    client, sent = _paho()
    client._last_mid = sub.packet_id - 1
    client._send_subscribe(False, [(t.encode("utf-8"), q) for t, q in sub.topics])
    client._last_mid = unsub.packet_id - 1
    client._send_unsubscribe(False, [t.encode("utf-8") for t in unsub.topics])
    assert sent == [encode(sub), encode(unsub)]
    assert Decoder().feed(b"".join(sent)) == [sub, unsub]


@FEW
@given(packet_ids)
def test_paho_simple_packets(pid):
    client, sent = _paho()
    client._send_puback(pid)
    client._send_pubrec(pid)
    client._send_pubrel(pid)
    client._send_pubcomp(pid)
    client._send_pingreq()
    client._send_disconnect()
    assert Decoder().feed(b"".join(sent)) == [
        p.Puback(pid), p.Pubrec(pid), p.Pubrel(pid), p.Pubcomp(pid), p.Pingreq(), p.Disconnect()]
    assert sent[0] == encode_puback(pid)


@FEW
@given(st.lists(publishes(payload=small_bytes).filter(lambda x: x.qos < 2), min_size=1,
                max_size=4), st.data())
def test_paho_receives_our_publish(pubs, data):
    """Server -> device: a real client parses what the hub encodes, and its PUBACKs decode."""
    client, sent = _paho()
    got = []
    client.on_message = lambda c, u, msg: got.append(msg)
    _paho_receive(client, b"".join(encode(x) for x in pubs))
    assert [(m.topic, m.payload, m.qos, bool(m.retain), bool(m.dup)) for m in got] == \
        [(x.topic, x.payload, x.qos, x.retain, x.dup) for x in pubs]
    assert [m.mid for m in got if m.qos] == [x.packet_id for x in pubs if x.qos]
    assert Decoder().feed(b"".join(sent)) == [p.Puback(x.packet_id) for x in pubs if x.qos]


@pytest.mark.parametrize("connack", [p.Connack(0), p.Connack(0, True)], ids=repr)
def test_paho_receives_our_connack_and_suback(connack):
    client, _ = _paho()
    events = []
    client.on_connect = lambda c, u, flags, rc: events.append(("connack", flags, rc))
    client.on_subscribe = lambda c, u, mid, granted: events.append(("suback", mid, granted))
    client.on_unsubscribe = lambda c, u, mid: events.append(("unsuback", mid))
    _paho_receive(client, encode(connack) + encode(p.Suback(42, [1, 0, 0x80]))
                  + encode(p.Unsuback(43)) + encode(p.Pingresp()))
    assert events == [
        ("connack", {"session present": int(connack.session_present)}, connack.return_code),
        ("suback", 42, (1, 0, 0x80)),
        ("unsuback", 43),
    ]


@pytest.mark.parametrize("code", range(2, 6))  # paho answers 1 by downgrading to 3.1
def test_paho_receives_our_refused_connack(code):
    client, _ = _paho()
    events = []
    client.on_connect = lambda c, u, flags, rc: events.append((flags, rc))
    client._sock = _FakeSock(encode(p.Connack(code)))
    assert client._packet_read() == mqtt_client.MQTT_ERR_CONN_REFUSED
    assert events == [({"session present": 0}, code)]
