"""The telemetry topic parser (iothub/topics.py): property bags decode the same whether or not the
parser has seen a key or an escaped value before, and its caches stay bounded."""
from pytest_iotfailover.iothub import topics as t

PREFIX = t.events_prefix("dev1")


def test_escaped_values_decode_the_same_the_first_time_and_after():
    topic = f"{PREFIX}/%24.mid=m%201&%24.ct=application%2Fjson&%24.ce=utf-8&unit=%C2%B0C&plain=x"
    first = t.parse_d2c_topic(PREFIX, topic)
    again = t.parse_d2c_topic(PREFIX, topic)
    assert first == again == (
        {"unit": "\u00b0C", "plain": "x"},
        {"message_id": "m 1", "content_type": "application/json", "content_encoding": "utf-8"},
    )


def test_the_value_cache_is_bounded_and_keeps_long_values_out():
    long_value = "%41" * (t._KEY_CACHED_LEN // 3 + 1)
    assert t.parse_d2c_topic(PREFIX, f"{PREFIX}/k={long_value}")[0] == {"k": "A" * (t._KEY_CACHED_LEN // 3 + 1)}
    assert long_value not in t._VALUES
    for i in range(t._KEYS_MAX + 10):
        assert t.parse_d2c_topic(PREFIX, f"{PREFIX}/k=v%20{i}")[0] == {"k": f"v {i}"}
        assert len(t._VALUES) <= t._KEYS_MAX
