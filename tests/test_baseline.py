"""Comparing a run with a baseline report: regressions fail, what cannot be compared is reported."""

import json

import pytest

from pytest_iotfailover.testing.baseline import (
    FLOOR,
    BaselineError,
    Missing,
    Regression,
    compare,
    load_report,
    parse_regression,
    run_label,
)

NODE = "tests/test_x.py::test_failover"


def fault(kind="region_failover", recover=1.2, p99=2.0):
    return {"fault": kind, "params": {"outage": 30},
            "figures": {"time_to_detect": 0.1, "time_to_recover": recover, "downtime_max": 3.0,
                        "downtime_p99": p99, "throttled": None}}


def report(*tests, created="2026-11-24T08:15:00+00:00"):
    doc = {"tests": [{"nodeid": nodeid, "outcome": outcome, "faults": faults,
                      "delivery": {"sent": 10, "delivered": 10, "lost": 0}} for nodeid, outcome, faults in tests]}
    if created is not None:
        doc["created"] = created
    return doc


def one(faults, outcome="passed", nodeid=NODE, **kw):
    return report((nodeid, outcome, faults), **kw)


@pytest.mark.parametrize("text, fraction", [("20%", 0.2), ("0%", 0.0), (" 12.5 % ", 0.125), ("150%", 1.5),
                                            (".5%", 0.005)])
def test_regression_is_a_percentage(text, fraction):
    assert parse_regression(text) == pytest.approx(fraction)


@pytest.mark.parametrize("text", ["20", "0.2", "-5%", "20 percent", "", "%", "twenty%", None])
def test_a_bad_regression_names_the_option_and_the_value(text):
    with pytest.raises(BaselineError) as e:
        parse_regression(text, source="iothub_max_regression")
    assert str(e.value) == (f"iothub_max_regression: bad value {text!r}: give a percentage of 0 or more, "
                            "e.g. 20%")


@pytest.mark.parametrize("base, now, allowed, expected", [
    # worse by more than allowed: both figures named
    (1.20, 1.61, 0.2, ("baseline: recover 1.20s (run 2026-11-24), now 1.61s: 34% worse, allowed 20% "
                      "(region_failover #1)")),
    # just over: enough decimals that the figure shown is over the allowed one
    (1.00, 1.202, 0.2, ("baseline: recover 1.00s (run 2026-11-24), now 1.20s: 20.2% worse, allowed 20% "
                       "(region_failover #1)")),
    (2.00, 2.56, 0.125, ("baseline: recover 2.00s (run 2026-11-24), now 2.56s: 28% worse, allowed 12.5% "
                        "(region_failover #1)")),
    (1.00, 1.20, 0.2, None),        # exactly the allowed regression passes
    (1.50, 1.80, 0.2, None),        # the same, where the float ratio lands a hair over 0.2
    (1.20, 0.90, 0.2, None),        # improvement
    (1.20, 1.20, 0.0, None),        # unchanged, nothing allowed
    (0.20, 0.30, 0.0, None),        # 50% worse but only by the floor: ignored
    (0.20, 0.31, 0.0, ("baseline: recover 0.20s (run 2026-11-24), now 0.31s: 55% worse, allowed 0% "
                      "(region_failover #1)")),
    (0.0, 0.05, 0.2, None),         # zero baseline, below the floor
    (0.0, 0.35, 0.2, ("baseline: recover 0.00s (run 2026-11-24), now 0.35s: 0.35s worse than a zero baseline, "
                     "allowed 20% (region_failover #1)")),
])
def test_time_to_recover_against_the_baseline(base, now, allowed, expected):
    out = compare(one([fault(recover=now)]), one([fault(recover=base)]), allowed)
    if expected is None:
        assert out == []
        return
    [r] = out
    assert isinstance(r, Regression)
    assert (r.nodeid, r.fault, r.occurrence, r.figure, r.baseline, r.now, r.allowed) == (
        NODE, "region_failover", 1, "recover", base, now, allowed)
    assert str(r) == expected


def test_downtime_p99_is_compared_too():
    [r] = compare(one([fault(p99=3.0)]), one([fault(p99=2.0)]), 0.2)
    assert r.figure == "downtime_p99"
    assert r.message == ("baseline: downtime_p99 2.00s (run 2026-11-24), now 3.00s: 50% worse, allowed 20% "
                         "(region_failover #1)")


def test_the_floor_is_a_parameter():
    assert FLOOR == 0.1
    assert compare(one([fault(recover=0.05)]), one([fault(recover=0.0)]), 0.2, floor=0.0) != []
    assert compare(one([fault(recover=5.0)]), one([fault(recover=1.0)]), 0.2, floor=10.0) == []


def test_a_figure_the_baseline_has_and_this_run_lacks_is_a_regression():
    [r] = compare(one([fault(recover=None)]), one([fault(recover=1.2)]), 0.2)
    assert isinstance(r, Regression) and r.now is None
    assert r.message == ("baseline: recover 1.20s (run 2026-11-24), now no figure: a device did not come back "
                         "or the fault did not end (region_failover #1)")


def test_faults_pair_by_kind_and_occurrence():
    base = one([fault("region_failover", recover=1.0), fault("region_failover", recover=2.0)])
    # a drop inserted first does not shift the pairs; the second failover regressed
    now = one([fault("drop", recover=0.1), fault("region_failover", recover=1.0),
               fault("region_failover", recover=3.0)])
    out = compare(now, base, 0.2)
    assert [(type(x).__name__, x.fault, x.occurrence, x.figure) for x in out] == [
        ("Missing", "drop", 1, None), ("Regression", "region_failover", 2, "recover")]
    assert out[0].message == f"{NODE}: drop #1 is not in the baseline (run 2026-11-24)"
    assert out[1].message.endswith("(region_failover #2)")


def test_a_baseline_fault_this_run_lacks_is_reported():
    [m] = compare(one([fault()]), one([fault(), fault()]), 0.2)
    assert isinstance(m, Missing) and (m.fault, m.occurrence) == ("region_failover", 2)
    assert m.message == f"{NODE}: the baseline (run 2026-11-24) has region_failover #2; this run does not"


def test_tests_missing_from_the_baseline_are_reported_not_failed():
    now = report((NODE, "passed", [fault()]), ("tests/test_x.py::test_new", "passed", [fault()]),
                 ("tests/test_x.py::test_no_fault", "passed", []))
    [m] = compare(now, one([fault()]), 0.2)
    assert isinstance(m, Missing) and m.nodeid == "tests/test_x.py::test_new" and m.fault is None
    assert m.message == "tests/test_x.py::test_new: not in the baseline (run 2026-11-24): not compared"


def test_baseline_tests_this_run_did_not_select_are_ignored():
    base = report((NODE, "passed", [fault()]), ("tests/test_x.py::test_deselected", "passed", [fault()]))
    assert compare(one([fault()]), base, 0.2) == []


def test_a_figure_the_baseline_lacks_is_reported():
    base_fault = fault(p99=None)
    [m] = compare(one([fault()]), one([base_fault]), 0.2)
    assert isinstance(m, Missing) and m.figure == "downtime_p99"
    assert m.message == f"{NODE}: region_failover #1: the baseline (run 2026-11-24) has no downtime_p99 figure"


def test_a_baseline_test_that_did_not_pass_is_not_compared():
    [m] = compare(one([fault(recover=9.0)]), one([fault(recover=1.0)], outcome="failed"), 0.2)
    assert isinstance(m, Missing)
    assert m.message == f"{NODE}: failed in the baseline (run 2026-11-24): not compared"


@pytest.mark.parametrize("created, label", [
    ("2026-11-24T08:15:00+00:00", "2026-11-24"), ("2026-11-24T23:59:59Z", "2026-11-24"),
    (1795478400, "2026-11-24"), ("nightly-417", "nightly-417"), (None, None),
])
def test_the_run_is_named_by_the_baseline_date(created, label):
    assert run_label(one([], created=created)) == label


def test_the_run_label_can_be_given_and_can_be_absent():
    out = compare(one([fault(recover=2.0)]), one([fault()], created=None), 0.2)
    assert out[0].message.startswith("baseline: recover 1.20s, now 2.00s: ")
    out = compare(one([fault(recover=2.0)]), one([fault()]), 0.2, baseline_label="base.json")
    assert out[0].message.startswith("baseline: recover 1.20s (run base.json), now 2.00s: ")


@pytest.mark.parametrize("doc, problem", [
    ([], "not a report: expected an object with a 'tests' list"),
    ({"tests": {}}, "not a report: expected an object with a 'tests' list"),
    ({"tests": [{"outcome": "passed"}]}, "tests[0] has no nodeid"),
    ({"tests": [{"nodeid": NODE, "faults": {}}]}, f"tests[0] ({NODE}): 'faults' is not a list"),
    ({"tests": [{"nodeid": NODE, "faults": [{"figures": {}}]}]}, f"tests[0] ({NODE}): faults[0] has no fault kind"),
    ({"tests": [{"nodeid": NODE, "faults": [{"fault": "drop", "figures": []}]}]},
     f"tests[0] ({NODE}): faults[0].figures is not an object"),
    ({"tests": [{"nodeid": NODE, "faults": [{"fault": "drop", "figures": {"time_to_recover": "1.2"}}]}]},
     f"tests[0] ({NODE}): faults[0] time_to_recover is '1.2', not a time in seconds"),
    ({"tests": [{"nodeid": NODE, "faults": [{"fault": "drop", "figures": {"downtime_p99": -1}}]}]},
     f"tests[0] ({NODE}): faults[0] downtime_p99 is -1, not a time in seconds"),
])
def test_a_malformed_report_is_an_error_naming_what_is_wrong(tmp_path, doc, problem):
    path = tmp_path / "base.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(BaselineError) as e:
        load_report(path)
    assert str(e.value) == f"--iothub-baseline: {path}: {problem}"
    with pytest.raises(BaselineError, match="baseline report: "):
        compare(one([fault()]), doc, 0.2)


def test_an_unreadable_baseline_names_the_option_and_the_file(tmp_path):
    with pytest.raises(BaselineError, match=r"--iothub-baseline: cannot read .*nope\.json: No such file"):
        load_report(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(BaselineError, match=r"--iothub-baseline: .*bad\.json is not a JSON report: "):
        load_report(bad)


def test_a_report_round_trips_through_a_file(tmp_path):
    path = tmp_path / "base.json"
    path.write_text(json.dumps(one([fault()])))
    assert compare(one([fault(recover=1.3)]), load_report(path), 0.2) == []


@pytest.mark.parametrize("allowed", [-0.1, float("nan"), float("inf"), "20%"])
def test_max_regression_must_be_a_fraction(allowed):
    with pytest.raises(BaselineError, match="max_regression must be a fraction of 0 or more"):
        compare(one([]), one([]), allowed)


def schema_fault(kind="region_failover", recover=1.2, p99=2.0):
    """A fault as report_schema.json (and --iothub-report) spells it: its kind under `kind`."""
    f = fault(kind, recover, p99)
    f["kind"] = f.pop("fault")
    return f


def test_a_report_in_the_schema_shape_is_read_by_kind(tmp_path):
    path = tmp_path / "base.json"
    path.write_text(json.dumps(one([schema_fault(), schema_fault("drop", recover=0.5)])))
    base = load_report(path)
    found = compare(one([fault(recover=2.0), fault("drop", recover=0.5)]), base, 0.2)
    assert [(type(f).__name__, f.fault, f.occurrence, f.figure) for f in found] == \
        [("Regression", "region_failover", 1, "recover")]


def test_the_old_spelling_fault_is_still_read(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps(one([fault()])))
    assert compare(one([schema_fault(recover=1.25)]), load_report(path), 0.2) == []


def test_kind_wins_over_fault_and_a_fault_with_neither_is_named(tmp_path):
    both = dict(schema_fault("drop"), fault="region_failover")
    found = compare(one([fault("drop", recover=9.0)]), one([both]), 0.2)
    assert [f.fault for f in found] == ["drop"]
    path = tmp_path / "neither.json"
    path.write_text(json.dumps(one([{"figures": {}}])))
    with pytest.raises(BaselineError, match=r"faults\[0\] has no fault kind"):
        load_report(path)


def test_a_schema_report_is_labelled_by_its_run_start():
    doc = one([schema_fault()], created=None)
    doc["run"] = {"started_at": 1_780_000_000.0}
    assert run_label(doc) == "2026-05-28"


@pytest.mark.parametrize("spelling", ["kind", "fault"])
def test_the_gate_reads_baselines_with_the_shared_loader(tmp_path, spelling):
    from types import SimpleNamespace

    from pytest_iotfailover.plugin import gate
    path = tmp_path / "base.json"
    path.write_text(json.dumps(one([schema_fault() if spelling == "kind" else fault()])))
    settings = SimpleNamespace(baseline=str(path), max_regression=0.2)
    base = gate.load_baseline(settings)
    assert base == load_report(path)
    entry = {"nodeid": NODE, "outcome": "passed", "delivery": None, "faults": [
        {"kind": "region_failover", "target": None, "started_at": 1.0, "ended_at": 2.0,
         "figures": dict(schema_fault(recover=2.0)["figures"], throttled_time=0.0, outage=1.0),
         "recovery": []}]}
    regressions, missing = gate.compare_baseline(entry, base, str(path), 0.2)
    assert len(regressions) == 1 and "recover 1.20s" in regressions[0] and missing == []
    path.write_text(json.dumps(one([{"figures": {}}])))
    with pytest.raises(pytest.UsageError, match=rf"--iothub-baseline: {path}: .*faults\[0\] has no fault kind"):
        gate.load_baseline(settings)
