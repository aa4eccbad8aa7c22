"""The recovery-objective grammar: parsing, merging a marker over the session, verdicts and texts."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_iotfailover.testing.slo import (
    FIGURES,
    Objectives,
    SloSyntaxError,
    evaluate,
    evaluate_test,
    failures,
    parse_objectives,
)

REGION = {"fault": "region_failover", "outage": 30.0, "devices": 20, "last_back": "dev-7"}
REGION_TEXT = "region_failover outage 30.00s, 20 devices, device dev-7 last back"


@pytest.mark.parametrize("text, expected", [
    ("recover<=30s, lost==0, duplicates<=1%", [("recover", "<=", 30.0, "30s"), ("lost", "==", 0.0, "0"),
                                                ("duplicates%", "<=", 1.0, "1%")]),
    ("  detect < 2.5s ,latency_p99<500ms", [("detect", "<", 2.5, "2.5s"), ("latency_p99", "<", 0.5, "500ms")]),
    ("downtime_max>=0s\ndowntime_p99>.5s,\n", [("downtime_max", ">=", 0.0, "0s"),
                                               ("downtime_p99", ">", 0.5, ".5s")]),
    ("throttled==0ms", [("throttled", "==", 0.0, "0ms")]),
    ("lost_in_failover<=10, lost<=0.5%", [("lost_in_failover", "<=", 10.0, "10"), ("lost%", "<=", 0.5, "0.5%")]),
    ("duplicates<=5, duplicates<=1%", [("duplicates", "<=", 5.0, "5"), ("duplicates%", "<=", 1.0, "1%")]),
    ("recover<=1.5 s", [("recover", "<=", 1.5, "1.5s")]),
    ("", []),
    (" , \n ", []),
])
def test_good_objectives_parse(text, expected):
    objs = parse_objectives(text)
    assert [(k, o.op, o.threshold, o.shown) for k, o in objs.items()] == expected
    assert all(o.source == "--iothub-slo" for o in objs.values())


def test_text_is_normalised_and_reparses():
    objs = parse_objectives(" recover <= 30 s ,lost==0 ")
    assert str(objs) == "recover<=30s, lost==0"
    assert parse_objectives(str(objs)) == objs


@pytest.mark.parametrize("text, bad_term, problem", [
    ("recovr<=30s", "recovr<=30s", "unknown figure 'recovr' (did you mean 'recover'?)"),
    ("Recover<=30s", "Recover<=30s", "unknown figure 'Recover' (did you mean 'recover'?)"),
    ("uptime>=99%", "uptime>=99%", "unknown figure 'uptime'"),
    ("recover=30s", "recover=30s", "'=' is not a comparison (did you mean '=='?)"),
    ("recover=<30s", "recover=<30s", "'=<' is not a comparison (did you mean '<='?)"),
    ("lost!=0", "lost!=0", "'!=' is not a comparison"),
    ("recover", "recover", "no comparison after 'recover'"),
    ("recover 30s", "recover 30s", "no comparison after 'recover'"),
    ("recover<=", "recover<=", "no value after '<='"),
    ("recover<=soon", "recover<=soon", "'soon' is not a number with an optional unit"),
    ("recover<=30s lost==0", "recover<=30s lost==0", "(a comma missing between two terms?)"),
    ("recover<=30", "recover<=30", "recover is a time: give a unit, s or ms (e.g. recover<=30s)"),
    ("recover<=30min", "recover<=30min", "recover is a time: unit 'min' is not s or ms"),
    ("recover<=5%", "recover<=5%", "recover is a time: unit '%' is not s or ms"),
    ("lost<=2s", "lost<=2s", "lost is a count of messages: unit 's' is not allowed"),
    ("lost<=1.5", "lost<=1.5", "lost is a count of messages: give a whole number or a percentage"),
    ("recover<=-1s", "recover<=-1s", "a figure is never negative"),
    ("duplicates%<=1", "duplicates%<=1", "put the % on the value: duplicates<=1%"),
    ("<=30s", "<=30s", "a term is <figure><op><value>"),
    ("lost==0, recover<=30s, recover<=10s", "recover<=10s", "recover is already given as 'recover<=30s'"),
    ("recover<=30s, recover<=10000ms", "recover<=10000ms", "recover is already given as 'recover<=30s'"),
    ("duplicates<=1%, duplicates<=2%", "duplicates<=2%", "duplicates% is already given as 'duplicates<=1%'"),
])
def test_bad_objectives_name_the_source_the_term_and_the_figures(text, bad_term, problem):
    with pytest.raises(SloSyntaxError) as e:
        parse_objectives(text, source="IOTFAILOVER_SLO (environment)")
    msg = str(e.value)
    assert msg.startswith(f"IOTFAILOVER_SLO (environment): bad objective {bad_term!r}: ")
    assert problem in msg
    assert "known figures: " + ", ".join(FIGURES) in msg
    assert e.value.source == "IOTFAILOVER_SLO (environment)" and e.value.term == bad_term
    assert isinstance(e.value, ValueError)


def test_objectives_must_be_text():
    with pytest.raises(SloSyntaxError, match="iothub_slo: bad objective '30'"):
        parse_objectives(30, source="iothub_slo")  # type: ignore[arg-type]


@pytest.mark.parametrize("session, marker, expected", [
    ("recover<=30s, lost==0", "recover<=10s", "recover<=10s, lost==0"),
    ("recover<=30s, lost==0", "detect<=5s", "recover<=30s, lost==0, detect<=5s"),
    ("recover<=30s", "recover<=30000ms, lost<=1%", "recover<=30000ms, lost<=1%"),
    ("duplicates<=1%", "duplicates<=3", "duplicates<=1%, duplicates<=3"),     # count and rate are two keys
    ("duplicates<=1%", "duplicates<=100%", "duplicates<=100%"),                # a marker loosens a session rule
    ("", "lost==0", "lost==0"),
    ("lost==0", "", "lost==0"),
])
def test_marker_overrides_the_session_per_key(session, marker, expected):
    s = parse_objectives(session)
    m = parse_objectives(marker, source="@pytest.mark.failover(slo=...)")
    merged = s.merged(m)
    assert str(merged) == expected
    for key, o in merged.items():
        assert o.source == ("@pytest.mark.failover(slo=...)" if key in m else "--iothub-slo")
    assert str(s) == session  # the session objectives are left as they were


@pytest.mark.parametrize("objective, measured, ok, text", [
    ("recover<=30s", 41.2, False, "SLO broken: recover 41.2s > 30s"),
    ("recover<=30s", 30.0, True, "SLO met: recover 30.0s <= 30s"),
    ("recover<=30s", 30.04, False, "SLO broken: recover 30.04s > 30s"),          # not "30.0s > 30s"
    ("recover<=30s", 30.004, False, "SLO broken: recover 30.004s > 30s"),
    ("recover<=30s", 30.0000001, False, "SLO broken: recover 30.0000001s > 30s"),
    ("recover<=30s", 12.345678, True, "SLO met: recover 12.35s <= 30s"),
    ("recover<=30s", 29.999, True, "SLO met: recover 30.0s <= 30s"),
    ("recover<30s", 30.0, False, "SLO broken: recover 30.0s >= 30s"),
    ("recover<30s", 29.96, True, "SLO met: recover 29.96s < 30s"),
    ("detect>=1s", 0.5, False, "SLO broken: detect 0.5s < 1s"),
    ("detect>1s", 1.0, False, "SLO broken: detect 1.0s <= 1s"),
    ("detect>1s", 1.001, True, "SLO met: detect 1.001s > 1s"),
    ("throttled==0s", 0.0, True, "SLO met: throttled 0.0s == 0s"),
    ("throttled==0s", 0.25, False, "SLO broken: throttled 0.25s != 0s"),
    ("downtime_p99<=500ms", 0.5, True, "SLO met: downtime_p99 500ms <= 500ms"),
    ("downtime_p99<=500ms", 1.25, False, "SLO broken: downtime_p99 1250ms > 500ms"),
    ("downtime_p99<=500ms", 0.5004, False, "SLO broken: downtime_p99 500.4ms > 500ms"),
    ("downtime_max<=10s", math.inf, False, "SLO broken: downtime_max never > 10s"),
    ("downtime_max>=10s", math.inf, True, "SLO met: downtime_max never >= 10s"),
])
def test_per_fault_verdicts_at_the_boundaries(objective, measured, ok, text):
    objs = parse_objectives(objective)
    [v] = evaluate(objs, {next(iter(objs)): measured}, REGION)
    assert v.ok is ok
    assert v.measured == measured
    assert v.objective == objective
    assert v.message == f"{text} ({REGION_TEXT})"


def test_the_issue_example_text():
    [v] = evaluate(parse_objectives("recover<=30s"), {"recover": 41.2}, REGION)
    assert str(v) == ("SLO broken: recover 41.2s > 30s (region_failover outage 30.00s, 20 devices, "
                      "device dev-7 last back)")


@pytest.mark.parametrize("objective, figures, sent, ok, text", [
    ("lost==0", {"lost": 0}, 100, True, "SLO met: lost 0 == 0"),
    ("lost==0", {"lost": 1}, 100, False, "SLO broken: lost 1 != 0"),
    ("lost<=2", {"lost": 2}, 100, True, "SLO met: lost 2 <= 2"),
    ("duplicates<=1%", {"duplicates": 2, "duplicates%": 1.0}, 200, True,
     "SLO met: duplicates 1.0% <= 1% (2 of 200 sent; "),
    ("duplicates<=1%", {"duplicates": 3, "duplicates%": 1.5}, 200, False,
     "SLO broken: duplicates 1.5% > 1% (3 of 200 sent; "),
    ("duplicates<1%", {"duplicates": 1, "duplicates%": 1.0}, 100, False,
     "SLO broken: duplicates 1.0% >= 1% (1 of 100 sent; "),
    ("lost_in_failover<=10", {"lost_in_failover": 11}, 100, False, "SLO broken: lost_in_failover 11 > 10"),
    ("latency_p99<=2s", {"latency_p99": 1.994}, 100, True, "SLO met: latency_p99 1.99s <= 2s"),
    ("latency_p99<=2s", {"latency_p99": 2.001}, 100, False, "SLO broken: latency_p99 2.001s > 2s"),
])
def test_delivery_verdicts(objective, figures, sent, ok, text):
    [v] = evaluate(parse_objectives(objective), figures, {"faults": [REGION], "sent": sent})
    assert v.ok is ok
    assert v.message.startswith(text)
    assert v.message.endswith(f"{REGION_TEXT})")


@pytest.mark.parametrize("figures", [{}, {"recover": None}])
def test_an_absent_figure_is_not_measured_never_met(figures):
    [v] = evaluate(parse_objectives("recover<=30s"), figures, REGION, missing={"recover": "no device was affected"})
    assert v.ok is None and v.measured is None
    assert v.message == f"SLO not measured: recover<=30s: no device was affected ({REGION_TEXT})"
    [v] = evaluate(parse_objectives("recover<=30s"), figures, {})
    assert v.message == "SLO not measured: recover<=30s: no recover figure was measured"
    assert failures([v]) == [v.message]


@pytest.mark.parametrize("context, text", [
    ({"fault": "drop", "target": "dev-3", "outage": 5, "devices": 1, "last_back": "dev-3"},
     "drop@dev-3 outage 5.00s, 1 device, device dev-3 last back"),
    ({"fault": "region_failover", "index": 2, "outage": 30.0, "devices": 20, "not_back": 3, "last_back": "d"},
     "region_failover #2 outage 30.00s, 20 devices, 3 not back"),
    ({"fault": "throttle"}, "throttle"),
    ({"faults": [{"fault": "drop", "devices": 2}, {"fault": "region_failover", "outage": 1.0}]},
     "drop, 2 devices; region_failover outage 1.00s"),
    ({"faults": []}, "no fault"),
])
def test_context_texts(context, text):
    [v] = evaluate(parse_objectives("recover<=30s"), {"recover": 1.0}, context)
    assert v.message == f"SLO met: recover 1.0s <= 30s ({text})"


def _test_entry(faults=None, delivery=None):
    entry = {"nodeid": "tests/test_x.py::test_failover", "outcome": "passed", "faults": faults or []}
    if delivery is not None:
        entry["delivery"] = delivery
    return entry


def _fault(kind="region_failover", recover=1.0, **extra):
    return {"fault": kind, "params": {}, "outage": 30.0, "devices": 20, "last_back": "dev-7",
            "figures": {"time_to_detect": 0.2, "time_to_recover": recover, "downtime_max": 31.0,
                        "downtime_p99": 30.9, "throttled": None}, **extra}


DELIVERY = {"sent": 200, "delivered": 200, "lost": 0, "lost_in_failover": 0, "duplicates": 3,
            "latency_p99": 0.8}


def test_each_fault_gets_its_own_verdicts_and_delivery_is_judged_once():
    objs = parse_objectives("recover<=30s, lost==0, duplicates<=1%")
    verdicts = evaluate_test(objs, _test_entry([_fault(recover=41.2), _fault("drop", recover=2.0)], DELIVERY))
    assert [(v.figure, v.fault, v.fault_index, v.ok) for v in verdicts] == [
        ("recover", "region_failover", 0, False), ("recover", "drop", 1, True),
        ("lost", None, None, True), ("duplicates%", None, None, False)]
    assert verdicts[0].message == ("SLO broken: recover 41.2s > 30s (region_failover #1 outage 30.00s, "
                                   "20 devices, device dev-7 last back)")
    assert verdicts[3].message == ("SLO broken: duplicates 1.5% > 1% (3 of 200 sent; region_failover #1 outage "
                                   "30.00s, 20 devices, device dev-7 last back; drop #2 outage 30.00s, "
                                   "20 devices, device dev-7 last back)")
    assert failures(verdicts) == [verdicts[0].message, verdicts[3].message]


def test_a_single_fault_is_not_numbered():
    [v] = evaluate_test(parse_objectives("detect<=1s"), _test_entry([_fault()]))
    assert v.message == f"SLO met: detect 0.2s <= 1s ({REGION_TEXT})"


@pytest.mark.parametrize("objective, entry, why", [
    ("lost==0", _test_entry([_fault()]), "the test made no delivery assertion"),
    ("recover<=30s", _test_entry([], DELIVERY), "the test started no fault"),
    ("throttled<=1s", _test_entry([_fault()]), "region_failover gave no throttled figure"),
    ("latency_p99<=1s", _test_entry([], {**DELIVERY, "latency_p99": None}),
     "the delivery assertion gave no latency_p99 figure"),
    ("lost_in_failover==0", _test_entry([], {k: v for k, v in DELIVERY.items() if k != "lost_in_failover"}),
     "the delivery assertion gave no lost_in_failover figure"),
    ("duplicates<=1%", _test_entry([], {**DELIVERY, "sent": 0, "duplicates": 0}), "nothing was sent"),
])
def test_objectives_on_figures_the_test_never_produced_say_so(objective, entry, why):
    [v] = evaluate_test(parse_objectives(objective), entry)
    assert v.ok is None
    assert v.message.startswith(f"SLO not measured: {objective}: {why}")
    assert failures([v]) == [v.message]


def test_a_device_that_never_came_back_breaks_recover_objectives():
    fault = _fault(recover=None, recovered=False, not_back=3)
    fault["figures"]["downtime_p99"] = None
    verdicts = evaluate_test(parse_objectives("recover<=30s, downtime_p99<=1s, detect<=1s"), _test_entry([fault]))
    assert [(v.figure, v.ok, v.measured) for v in verdicts] == [
        ("recover", False, math.inf), ("downtime_p99", False, math.inf), ("detect", True, 0.2)]
    assert verdicts[0].message == ("SLO broken: recover never > 30s (region_failover outage 30.00s, "
                                   "20 devices, 3 not back)")


def test_per_device_entries_give_the_device_count_and_the_last_one_back():
    fault = {"fault": "drop", "started_at": 100.0, "ended_at": 100.5,
             "devices": {"dev-1": {"reconnected_at": 101.0}, "dev-2": {"reconnected_at": 102.5},
                         "dev-3": {"reconnected_at": 101.7}},
             "figures": {"time_to_recover": 2.0}}
    [v] = evaluate_test(parse_objectives("recover<=1s"), _test_entry([fault]))
    assert v.message == "SLO broken: recover 2.0s > 1s (drop outage 0.50s, 3 devices, device dev-2 last back)"
    fault["devices"]["dev-3"] = {"reconnected_at": None}
    [v] = evaluate_test(parse_objectives("recover<=1s"), _test_entry([fault]))
    assert v.ok is False and v.message.endswith("(drop outage 0.50s, 3 devices, 1 not back)")


def test_a_figure_that_is_not_a_number_is_an_error_naming_it():
    fault = _fault()
    fault["figures"]["time_to_recover"] = "fast"
    with pytest.raises(TypeError, match="report figure time_to_recover is 'fast', not a number"):
        evaluate_test(parse_objectives("recover<=1s"), _test_entry([fault]))


def test_no_objectives_no_verdicts():
    assert evaluate_test(Objectives(), _test_entry([_fault()], DELIVERY)) == []
    assert evaluate_test(parse_objectives(""), _test_entry()) == []


def test_every_figure_maps_onto_a_report_key():
    fault_keys = {"time_to_detect", "time_to_recover", "downtime_max", "downtime_p99", "throttled"}
    delivery_keys = {"lost", "lost_in_failover", "duplicates", "latency_p99"}
    assert {f.key for f in FIGURES.values() if f.scope == "fault"} == fault_keys
    assert {f.key for f in FIGURES.values() if f.scope == "delivery"} == delivery_keys


# --- any input: a usage error or objectives, never another exception; shown values agree with verdicts

_TERM_PARTS = st.sampled_from([*FIGURES, "recovr", "duplicates%", "", " "])
_OPS = st.sampled_from(["<=", "<", "==", ">=", ">", "=", "!=", "=<", ""])
_VALUES = st.one_of(st.sampled_from(["30s", "500ms", "1%", "0", "1.5", "-1s", ".5s", "x", "", "3 s", "2min"]),
                    st.text(max_size=6))


@given(st.lists(st.tuples(_TERM_PARTS, _OPS, _VALUES), max_size=4), st.sampled_from([",", "\n", ", "]))
def test_any_text_parses_or_is_a_usage_error(terms, sep):
    text = sep.join(f"{n}{o}{v}" for n, o, v in terms)
    try:
        objs = parse_objectives(text)
    except SloSyntaxError as e:
        assert str(e).startswith("--iothub-slo: bad objective ")
    else:
        assert parse_objectives(str(objs)) == objs


@given(st.sampled_from(["<=", "<", "==", ">=", ">"]), st.integers(0, 100_000), st.sampled_from(["s", "ms"]),
       st.floats(0, 200, allow_nan=False))
def test_the_value_shown_never_contradicts_the_verdict(op, threshold, unit, measured):
    objs = parse_objectives(f"recover{op}{threshold / 1000 if unit == 's' else threshold}{unit}")
    [v] = evaluate(objs, {"recover": measured}, {})
    shown = v.message.split(" ")[3]
    number = float(shown[:-len(unit)])
    seconds = number / 1000 if unit == "ms" else number
    assert objs["recover"].holds(seconds) is v.ok
