"""IoT Hub's limits: each validator accepts its boundary and refuses one past it."""
import json
import math

import pytest

from pytest_iotfailover.iothub import limits as L
from pytest_iotfailover.iothub.limits import AccessPolicy, IotHubError

KEY_A = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="
KEY_B = "ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA="


def code(result):
    return result.code if isinstance(result, IotHubError) else None


def nested(levels, leaf="v", *, container=dict):
    """`levels` nested containers below the returned section object, built without recursion."""
    doc = leaf
    for _ in range(levels):
        doc = {"k": doc} if container is dict else [doc]
    return {"root": doc} if levels else {"root": leaf}


# --- errors --------------------------------------------------------------------------------------

def test_error_shape():
    err = L.iothub_error(413001, "too big")
    assert (err.code, err.name, err.status) == (413001, "MessageTooLarge", 413)
    assert err.body() == {"errorCode": 413001, "message": "too big"}
    assert str(err) == "413001 MessageTooLarge: too big"


# --- twins ---------------------------------------------------------------------------------------

def test_twin_key_length_boundary_is_1_kb_of_utf8():
    assert L.validate_twin_key("k" * 1024) is None
    assert code(L.validate_twin_key("k" * 1025)) == 400004
    assert L.validate_twin_key("é" * 512) is None               # two bytes each: exactly 1 KB
    assert code(L.validate_twin_key("é" * 513)) == 400004


@pytest.mark.parametrize("key", ["a.b", "$a", "a b", "a\x00", "a\x1f", "a\x7f", "a\x85"])
def test_twin_key_forbidden_characters(key):
    err = L.validate_twin_key(key)
    assert code(err) == 400004 and "forbids" in err.message


def test_twin_key_allowed_characters():
    for key in ("température", "a-b_c", "ключ", "a:b", "a/b", "a@b", "A"):
        assert L.validate_twin_key(key) is None, key
    assert code(L.validate_twin_key(1)) == 400004


def test_twin_string_boundary_is_4_kb():
    assert L.validate_twin_section({"s": "x" * 4096}, "reported") is None
    assert code(L.validate_twin_section({"s": "x" * 4097}, "reported")) == 400004


def test_twin_integer_boundaries():
    for ok in (L.TWIN_INT_MAX, L.TWIN_INT_MIN, 0, True, 1.5, 1e300):
        assert L.validate_twin_section({"n": ok}, "desired") is None, ok
    for bad in (L.TWIN_INT_MAX + 1, L.TWIN_INT_MIN - 1, math.nan, math.inf):
        assert code(L.validate_twin_section({"n": bad}, "desired")) == 400004, bad
    assert L.TWIN_INT_MAX == 4503599627370495 and L.TWIN_INT_MIN == -4503599627370496


def test_twin_depth_boundary_is_ten_levels_below_the_section():
    # the document's example: tags.one.two...ten.property is valid
    example = {"property": "value"}
    for name in reversed(("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")):
        example = {name: example}
    assert L.validate_twin_section(example, "tags") is None
    assert L.validate_twin_section(nested(10), "reported") is None
    err = L.validate_twin_section(nested(11), "reported")
    assert code(err) == 400004 and "deeper than 10" in err.message
    assert L.validate_twin_section(nested(10, container=list), "reported") is None
    assert code(L.validate_twin_section(nested(11, container=list), "reported")) == 400004


def test_deep_twin_does_not_raise_recursion_error():
    doc: dict = {}
    inner = doc
    for _ in range(100_000):
        inner["k"] = {}
        inner = inner["k"]
    err = L.validate_twin_section(doc, "reported")
    assert code(err) == 400004 and "deeper" in err.message
    cyclic: dict = {}
    cyclic["self"] = cyclic
    assert code(L.validate_twin_section(cyclic, "desired")) == 400004


def test_deep_json_text_is_refused_before_parsing():
    for text in ("[" * 100_000 + "]" * 100_000, '{"a":' * 100_000, b"[" * 1_000_000):
        value, err = L.loads_json(text)
        assert value is None and code(err) == 400004
    assert L.json_nesting_depth("[" * 100_000, stop_after=11) == 12
    assert L.json_nesting_depth("[" * 100_000) == 100_000
    assert L.json_nesting_depth(b'[["a\\\\"], "\\"[[[", {"b": "]]]"}]') == 2   # escapes and strings
    assert L.json_nesting_depth('["unterminated [[[') == 1


def test_loads_json():
    assert L.loads_json(b'{"a": [1, {"b": null}]}') == ({"a": [1, {"b": None}]}, None)
    # brackets inside strings are not nesting
    assert L.loads_json('{"a": "[[[[[[[[[[[[[[[[\\"{{{{"}', max_depth=1)[1] is None
    assert L.loads_json(json.dumps(nested(10)))[1] is None
    assert code(L.loads_json(json.dumps(nested(11)))[1]) == 400004
    for bad in (b"{", b"NaN", b'{"a": Infinity}', b"\xff\xfe"):
        value, err = L.loads_json(bad, what="reported properties")
        assert value is None and code(err) == 400006 and err.message.startswith("reported properties")


def _section_of(total_bytes, value_bytes=4094):
    """A section whose size by the twin rule is exactly `total_bytes` (two-character keys)."""
    doc, size, i = {}, 0, 0
    while total_bytes - size >= 2 + value_bytes:
        doc[f"{i:02d}"] = "x" * value_bytes
        size += 2 + value_bytes
        i += 1
    rest = total_bytes - size
    if rest:
        key = "z" * min(rest, 2)
        doc[key] = "x" * (rest - len(key))
    assert L.twin_section_size(doc) == total_bytes
    return doc


@pytest.mark.parametrize("section, limit", [("tags", 8192), ("desired", 32768), ("reported", 32768)])
def test_twin_section_size_boundary(section, limit):
    assert L.validate_twin_section(_section_of(limit), section) is None
    err = L.validate_twin_section(_section_of(limit + 1), section)
    assert code(err) == 400004 and "KB limit" in err.message


def test_twin_size_rule():
    assert L.twin_section_size({"a": 1}) == 9                # key 1 + number 8
    assert L.twin_section_size({"a": True}) == 5             # key 1 + boolean 4
    assert L.twin_section_size({"a": {"b": "cd"}}) == 4      # nested: sum of contents
    assert L.twin_section_size({"a": "x\x01y"}) == 3         # control characters do not count
    assert L.twin_section_size({"a": [1, "xy"]}) == 11
    assert L.twin_section_size({"a": None}) == 1
    # $version and $metadata are read-only and excluded from the size
    assert L.twin_section_size({"$version": 4, "$metadata": {"x": "y" * 100}, "a": 1}) == 9


def test_read_only_keys_only_with_allow_read_only():
    doc = {"$version": 3, "$metadata": {"$lastUpdated": "2024-01-01T00:00:00Z"}, "a": 1}
    assert L.validate_twin_section(doc, "reported", allow_read_only=True) is None
    assert code(L.validate_twin_section(doc, "reported")) == 400004


def test_twin_section_shape_errors():
    assert "JSON object" in L.validate_twin_section([], "reported").message
    assert "unknown twin section" in L.validate_twin_section({}, "properties").message
    assert code(L.validate_twin_section({"a": {1, 2}}, "reported")) == 400004
    assert L.validate_twin_section({}, "reported") is None


# --- direct methods --------------------------------------------------------------------------

def test_method_names():
    assert L.validate_method_name("reboot") is None
    assert L.validate_method_name("get-Status_2.x!*'~%&^|`#+") is None
    for bad in ["", None, "a b", "a\tb", "é", "a\x00"] + list('$()<>@,;:\\"/[]?={}'):
        assert code(L.validate_method_name(bad)) == 400004, bad


def test_method_payload_boundary_is_128_kb():
    assert L.validate_method_payload(128 * 1024) is None
    assert L.validate_method_payload(b"x" * 128 * 1024) is None
    assert code(L.validate_method_payload(128 * 1024 + 1)) == 413001
    err = L.validate_method_payload("x" * (128 * 1024 + 1), direction="response")
    assert code(err) == 413001 and "response" in err.message


def test_method_timeouts():
    assert (L.METHOD_RESPONSE_TIMEOUT_DEFAULT, L.METHOD_CONNECT_TIMEOUT_DEFAULT) == (30, 0)
    for ok in [(None, None), (5, 0), (300, 300), (30.5, 1)]:
        assert L.validate_method_timeouts(*ok) is None, ok
    for bad in [(4, None), (4.999, None), (301, None), (None, -1), (None, 301), (True, None),
                (math.nan, None), ("30", None), (None, math.inf)]:
        assert code(L.validate_method_timeouts(*bad)) == 400004, bad


# --- messages ----------------------------------------------------------------------------------

def test_message_size_rule():
    # body + system property values + application property names and values
    props = {"$.mid": "abc", "$.ct": "application/json", "temp": "21", "flag": None}
    assert L.message_size(b"12345", props) == 5 + 3 + 16 + 4 + 2 + 4
    assert L.message_size("é") == 2


def test_d2c_size_boundary_is_256_kb():
    limit = 256 * 1024
    assert L.validate_d2c_message(b"x" * limit) is None
    assert code(L.validate_d2c_message(b"x" * (limit + 1))) == 413001
    props = {"$.mid": "m1", "k": "v"}                    # counts 2 + 1 + 1
    assert L.validate_d2c_message(b"x" * (limit - 4), props) is None
    assert code(L.validate_d2c_message(b"x" * (limit - 3), props)) == 413001


def test_message_id_boundary_is_128_characters():
    assert L.validate_message_id("m" * 128) is None
    assert code(L.validate_message_id("m" * 129)) == 400004
    assert code(L.validate_d2c_message(b"", {"$.mid": "m" * 129})) == 400004
    assert L.validate_message_id("id 1/2") is None
    assert code(L.validate_message_id("id 1/2", check_charset=True)) == 400004
    assert L.validate_message_id("00:11:22:33-$'", check_charset=True) is None


def test_c2d_size_boundary_is_64_kb():
    limit = 64 * 1024
    assert L.validate_c2d_message(b"x" * limit) is None
    assert code(L.validate_c2d_message(b"x" * (limit + 1))) == 413001
    props = {"$.mid": "m1", "iothub-ack": "full"}        # 2 + 10 + 4
    assert L.validate_c2d_message(b"x" * (limit - 16), props) is None
    assert code(L.validate_c2d_message(b"x" * (limit - 15), props)) == 413001


def test_c2d_ack_values():
    for ok in ("none", "positive", "negative", "full", None):
        assert L.validate_c2d_ack(ok) is None
        assert L.validate_c2d_message(b"", {"iothub-ack": ok}) is None
    assert code(L.validate_c2d_ack("Full")) == 400004
    assert code(L.validate_c2d_message(b"", {"iothub-ack": "always"})) == 400004


def test_c2d_property_characters():
    assert L.validate_c2d_message(b"", {"a-b.c": "x~y|z"}) is None
    assert code(L.validate_c2d_message(b"", {"a b": "x"})) == 400004
    assert code(L.validate_c2d_message(b"", {"a": "x:y"})) == 400004
    assert L.validate_c2d_message(b"", {"a": "x:y"}, check_charset=False) is None


def test_c2d_queue_boundary_is_50():
    assert L.validate_c2d_enqueue(49) is None
    err = L.validate_c2d_enqueue(50)
    assert (err.code, err.name) == (403004, "DeviceMaximumQueueDepthExceeded")


def test_c2d_ttl():
    assert L.validate_c2d_default_ttl(60) is None and L.validate_c2d_default_ttl(2 * 86400) is None
    for bad in (59.9, 2 * 86400 + 1, math.nan, "3600"):
        assert code(L.validate_c2d_default_ttl(bad)) == 400004
    now = 1_700_000_000.0
    assert L.validate_c2d_expiry(now, now + 2 * 86400) is None
    assert code(L.validate_c2d_expiry(now, now + 2 * 86400 + 1)) == 403009
    assert L.validate_c2d_expiry(now, now - 10) is None           # accepted, then dead-lettered
    assert L.c2d_expiry(now) == now + 3600
    assert L.c2d_expiry(now, default_ttl=60) == now + 60
    assert L.c2d_expiry(now, expiry_time=now + 5) == now + 5


def test_c2d_expiry_check_uses_the_given_clock():
    expiry = L.c2d_expiry(1000.0)
    assert not L.c2d_expired(expiry, 1000.0 + 3599.999)
    assert L.c2d_expired(expiry, 1000.0 + 3600)


# --- MQTT property bags --------------------------------------------------------------------------

@pytest.mark.parametrize("topic", [
    # what azure-iot-device 2.14 sends (iothub-mqtt.md §3.2)
    ("devices/dev1/messages/events/%24.mid=id%201%2F2&%24.ct=application%2Fjson&%24.ce=utf-8"
     "&%24.exp=2030-01-01T00%3A00%3A00%2B00%3A00&%24.sub=comp&a=2&b=v%26%3D1"),
    "devices/dev1/messages/events/",
    "devices/dev1/messages/events",
    "devices/dev1/messages/events/$.ct=application%2Fjson&$.ce=utf-8",      # the docs' raw '$'
    "devices/dev1/modules/m1/messages/events/%24.on=out1/",                 # Node's trailing '/'
    "devices/a:b(c)/messages/events/k=v",                                    # ids are never encoded
    "devices/dev1/messages/events/?prop1&prop2=&prop3=a%20string",
    "$iothub/twin/PATCH/properties/reported/?$rid=6a1c&$version=3",
    "$iothub/methods/res/200/?$rid=1",
])
def test_encoded_property_bags_are_fine(topic):
    assert L.property_bag_problem(topic) is None
    assert not L.property_bag_breaks_connection(topic)


@pytest.mark.parametrize("topic, char", [
    ("devices/dev1/messages/events/timestamp=2019-02-15T15:11:31Z&%24.mid=4429", ":"),   # sdk-c #869
    ("devices/dev1/messages/events/te st=to%20st", " "),                                 # iothub #54
    ("devices/dev1/messages/events/a=%2", "%"),
    ("devices/dev1/messages/events/a=%zz", "%"),
    ("devices/dev1/messages/events/a=caf\u00e9", "\u00e9"),
    ("devices/dev1/messages/events/a=b/c", "/"),
    ("devices/dev1/modules/m/messages/events/a=b;c", ";"),
    ("$iothub/twin/GET/?$rid=a b", " "),
])
def test_raw_reserved_characters_break_the_connection(topic, char):
    problem = L.property_bag_problem(topic)
    assert problem is not None
    assert ("%XX" if char == "%" else repr(char)) in problem
    assert L.property_bag_breaks_connection(topic)


# --- user names and SAS keys ---------------------------------------------------------------------

HOST = "myhub.azure-devices.net"


@pytest.mark.parametrize("username, device, module, api", [
    (f"{HOST}/dev1/?api-version=2021-04-12&DeviceClientType=py%2F2.14", "dev1", None, "2021-04-12"),
    (f"{HOST}/dev1/api-version=2016-11-14&DeviceClientType=c", "dev1", None, "2016-11-14"),
    (f"{HOST}/dev1/", "dev1", None, None),
    (f"{HOST}/dev1", "dev1", None, None),
    (f"{HOST}/dev1/?", "dev1", None, None),
    (f"{HOST}/dev1/mod1/?api-version=2021-04-12", "dev1", "mod1", "2021-04-12"),
    (f"{HOST}/dev1/mod1/", "dev1", "mod1", None),
    (f"{HOST}/a?b/?api-version=1", "a?b", None, "1"),
])
def test_user_name_forms(username, device, module, api):
    u = L.parse_device_username(username)
    assert not isinstance(u, IotHubError)
    assert (u.hostname, u.device_id, u.module_id, u.api_version) == (HOST, device, module, api)


def test_user_name_errors():
    for bad in ("", "nonsense", "/dev1/", f"{HOST}//", None):
        assert code(L.parse_device_username(bad)) == 400004, bad


def test_sas_keys_without_skn_are_the_identity_keys():
    assert L.sas_keys_to_try(None, identity_keys=[KEY_A, "", KEY_B]) == (KEY_A, KEY_B)
    assert code(L.sas_keys_to_try(None, identity_keys=[""])) == 401002


def test_sas_keys_with_skn_come_from_a_device_connect_policy():
    policies = {name: AccessPolicy(name, KEY_A, KEY_B, perms) for name, perms in L.DEFAULT_POLICY_PERMISSIONS.items()}
    assert L.sas_keys_to_try("device", identity_keys=["x"], policies=policies) == (KEY_A, KEY_B)
    assert L.sas_keys_to_try("iothubowner", identity_keys=["x"], policies=policies.values()) == (KEY_A, KEY_B)
    for refused in ("service", "registryRead", "registryReadWrite", "nosuchpolicy", "Device"):
        err = L.sas_keys_to_try(refused, identity_keys=[KEY_A], policies=policies)
        assert code(err) == 401002, refused
        assert KEY_A not in err.message and KEY_B not in err.message
    empty = {"device": AccessPolicy("device", "")}
    assert code(L.sas_keys_to_try("device", identity_keys=[], policies=empty)) == 401002


def test_policy_repr_hides_keys():
    text = repr(AccessPolicy("device", KEY_A, KEY_B))
    assert "device" in text and KEY_A not in text and KEY_B not in text


def test_plain_bag_screen_agrees_with_the_rule():
    """The hub skips property_bag_problem for a bag that plain_bag matches: so a match must never
    hide a problem, and every bag the rule refuses must fail the screen."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    prefix = "devices/dev1/messages/events"
    alphabet = st.sampled_from(list("aZ09-_.!~*'()=&$%/?: ;,é+#") + ["%2F", "%24", "%zz", "%2"])

    @settings(max_examples=2000, deadline=None)
    @given(st.lists(alphabet, max_size=24).map("".join))
    def check(bag):
        topic = f"{prefix}/{bag}"
        if L.plain_bag(topic, len(prefix) + 1):
            assert L.property_bag_problem(topic) is None
        if L.property_bag_problem(topic) is not None:
            assert not L.plain_bag(topic, len(prefix) + 1)

    check()
    assert L.plain_bag(f"{prefix}/%24.mid=m1&%24.ct=application%2Fjson", len(prefix) + 1)
    assert L.plain_bag(prefix, len(prefix) + 1)  # no bag at all
    assert not L.plain_bag(f"{prefix}/a=1/", len(prefix) + 1)  # Node's trailing '/': the rule decides
