"""The timeline's HTML as text: self-contained, escaped, free of keys, bounded in elements (no browser needed)."""
import re

import pytest
from report_samples import make_report

from pytest_iotfailover.plugin import timeline

KEY = "c2VjcmV0LWtleS1vZi10aGUtZGV2aWNlLTAwMQ=="


@pytest.fixture(scope="module")
def page():
    return timeline.render_html(make_report(devices=20, messages=500))


def test_page_references_nothing_outside_itself(page):
    assert "<link" not in page and "@import" not in page and "url(" not in page
    assert re.findall(r"\b(?:src|href)=\"(?!#)", page) == []
    # the only URL is the SVG namespace name, which is never fetched
    assert set(re.findall(r"https?://[^\s\"']+", page)) == {"http://www.w3.org/2000/svg"}


def test_tests_without_a_fault_are_listed_but_get_no_timeline(page):
    assert "test_connects" in page
    assert page.count('<svg class="iotf-timeline"') == 1


def test_user_data_is_escaped_and_keys_redacted():
    report = make_report(devices=3, messages=30, device_prefix='<img src=x onerror="alert(1)">')
    test = report["tests"][1]
    test["devices"][0]["messages"][0]["id"] = "</script><script>alert(2)</script>"
    test["devices"][0]["messages"][1]["id"] = f"sr=h&sig={KEY}&se=1"
    test["faults"][0]["params"]["connection"] = f"HostName=h;SharedAccessKey={KEY}"
    test["nodeid"] = "t.py::test[<b>]"
    for out in (timeline.render_html(report), timeline.render_fragment(test)):
        assert "<img" not in out and "alert(2)</script>" not in out and "<b>" not in out
        assert KEY not in out
        assert "&lt;img src=x" in out


def test_fragment_needs_no_script_and_scopes_its_style():
    test = make_report(devices=4, messages=40)["tests"][1]
    frag = timeline.render_fragment(test)
    assert "<script" not in frag  # pytest-html inserts extras with innerHTML, where scripts never run
    assert frag.startswith('<div class="iotf"><style>')
    css = frag[frag.index("<style>") + 7:frag.index("</style>")]
    selectors = [s.strip() for rule in css.split("}") if "{" in rule for s in rule.split("{")[0].split(",")]
    assert all(s.startswith(".iotf") for s in selectors), selectors


@pytest.mark.parametrize(("devices", "lanes", "banded"), [(1, 1, False), (50, 50, False), (51, 17, True),
                                                          (200, 25, True)])
def test_lanes_become_bands_beyond_fifty_devices(devices, lanes, banded):
    frag = timeline.render_fragment(make_report(devices=devices, messages=devices * 5)["tests"][1])
    assert f'data-lanes="{lanes}" data-banded="{int(banded)}"' in frag
    assert frag.count('class="iotf-lane"') == lanes


def test_ten_thousand_messages_are_a_bounded_number_of_elements():
    frag = timeline.render_fragment(make_report(devices=200, messages=10_000)["tests"][1])
    lanes = frag.count('class="iotf-lane"')
    # per lane: at most one path per tick kind, never-acknowledged mark kind and connection state
    assert frag.count("<path") <= lanes * (len(timeline.TICKS) + len(timeline.MARKS) + len(timeline.STATES))


def test_never_disconnected_is_not_shown_as_not_recovered():
    test = make_report(devices=6, messages=60)["tests"][1]
    frag = timeline.render_fragment(test)
    throttle = frag[frag.index('<table class="iotf-figures" data-fault-id="2"'):]
    throttle = throttle[:throttle.index("</table>", throttle.index("iotf-recovery"))]
    assert "never disconnected" in throttle and "NOT RECOVERED" not in throttle


def test_sparse_test_records_still_render():
    test = {"nodeid": "t.py::test_x", "outcome": "failed", "started_at": 100.0, "ended_at": 100.0,
            "faults": [{"id": 0, "kind": "blackhole", "target": "dev-1", "params": {}, "started_at": 100.0,
                        "ended_at": None, "figures": {}, "recovery": []}],
            "devices": [{"device_id": "dev-1", "states": [{"state": "reconnecting", "from": 100.0, "to": None}],
                         "messages": []}],
            "delivery": None, "slos": []}
    frag = timeline.render_fragment(test)
    assert 'class="iotf-fault-window"' in frag and 'data-device="dev-1"' in frag
    page = timeline.render_html({"schema_version": 1, "run": {}, "tests": [test]})
    assert "FAILED" in page


@pytest.mark.parametrize(("where", "value"), [("started_at", "soon"), ("devices", [{"states": [{"state": "connected", "from": "x"}]}]),
                                              ("faults", [None])])
def test_a_malformed_record_is_named_in_a_clear_error(where, value):
    test = make_report(devices=2, messages=10)["tests"][1]
    test[where] = value
    with pytest.raises(ValueError, match=r"test_region_failover\[2-devices\].*does not follow the report schema"):
        timeline.render_fragment(test)


def test_a_record_that_is_not_an_object_is_refused():
    with pytest.raises(TypeError, match="must be an object, not list"):
        timeline.render_fragment([])
