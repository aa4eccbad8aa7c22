"""The committed run-report schema: it is valid draft 2020-12, accepts what the plugin writes, rejects the rest."""
import json
from importlib import resources

import jsonschema
import pytest
from report_samples import clone, make_report, outboxed


@pytest.fixture(scope="module")
def validator():
    schema = json.loads(resources.files("pytest_iotfailover.plugin").joinpath("report_schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


@pytest.fixture(scope="module")
def report():
    return make_report(devices=20, messages=400)


def _fault(rep):
    return rep["tests"][1]["faults"][0]


def test_synthetic_report_is_valid(validator, report):
    validator.validate(report)


def test_large_report_is_valid(validator):
    validator.validate(make_report(devices=200, messages=10_000))


def test_the_outboxes_view_is_valid_and_an_older_reader_still_finds_its_fields(validator, report):
    doc = outboxed(report)
    validator.validate(doc)
    msgs = [m for d in doc["tests"][1]["devices"] for m in d["messages"]]
    assert {m["outbox_state"] for m in msgs} == {"acknowledged", "pending"}
    # the fields version 1 always had are all still there, `sent` never empty
    assert all(m["sent"] and {"id", "sent", "acked", "delivered", "fate"} <= set(m) for m in msgs)


def test_attempt_times_and_device_acknowledgements_are_optional_and_checked(validator, report):
    doc = outboxed(report)
    msgs = [m for d in doc["tests"][1]["devices"] for m in d["messages"]]
    assert all(m["attempts"] and m["attempt_count"] >= len(m["attempts"]) for m in msgs)
    assert any("device_acked" in m for m in msgs) and any("device_acked" not in m for m in msgs)
    for m in msgs[::2]:  # what an Outbox writes for a message it never attempted: neither field
        m.pop("attempts"), m.pop("attempt_count"), m.pop("device_acked", None)
    validator.validate(doc)


@pytest.mark.parametrize("field, value", [("outbox_state", "given_up"), ("submitted", -1.0),
                                          ("failures", [None]), ("outbox", 3), ("attempts", []),
                                          ("attempts", [1.0] * 11), ("attempts", ["now"]), ("attempt_count", 0),
                                          ("attempt_count", 1.5), ("device_acked", None), ("device_acked", -2.0)])
def test_bad_outbox_fields_are_refused(validator, report, field, value):
    doc = outboxed(report)
    doc["tests"][1]["devices"][0]["messages"][0][field] = value
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(doc)


def test_attempts_need_their_count(validator, report):
    doc = outboxed(report)
    doc["tests"][1]["devices"][0]["messages"][0].pop("attempt_count")
    with pytest.raises(jsonschema.ValidationError, match="attempt_count"):
        validator.validate(doc)


def test_report_survives_a_json_round_trip(validator, report):
    validator.validate(json.loads(json.dumps(report)))


def test_never_disconnected_is_its_own_status(validator, report):
    statuses = {r["status"] for f in report["tests"][1]["faults"] for r in f["recovery"]}
    assert statuses == {"recovered", "not_recovered", "never_disconnected"}


BROKEN = {
    "wrong schema version": lambda r: r.__setitem__("schema_version", 2),
    "no run metadata": lambda r: r.pop("run"),
    "unknown backend": lambda r: r["run"].__setitem__("backend", "mock"),
    "missing hub tier": lambda r: r["run"].pop("hub_tier"),
    "unknown top-level field": lambda r: r.__setitem__("extra", 1),
    "unknown outcome": lambda r: r["tests"][1].__setitem__("outcome", "ok"),
    "fault without figures": lambda r: _fault(r).pop("figures"),
    "figure missing": lambda r: _fault(r)["figures"].pop("lost_in_failover"),
    "negative downtime": lambda r: _fault(r)["figures"].__setitem__("downtime_max", -1.0),
    "count as float": lambda r: _fault(r)["figures"].__setitem__("duplicates", 1.5),
    "nested fault parameter": lambda r: _fault(r)["params"].__setitem__("nested", {"a": 1}),
    "fault kind with spaces": lambda r: _fault(r).__setitem__("kind", "region failover"),
    "recovery status NOT RECOVERED": lambda r: _fault(r)["recovery"][0].__setitem__("status", "NOT RECOVERED"),
    "unknown connection state": lambda r: r["tests"][1]["devices"][0]["states"][0].__setitem__("state", "up"),
    "message never sent": lambda r: r["tests"][1]["devices"][0]["messages"][0].__setitem__("sent", []),
    "message time as string": lambda r: r["tests"][1]["devices"][0]["messages"][0].__setitem__("acked", "now"),
    "unknown fate": lambda r: r["tests"][1]["devices"][0]["messages"][0].__setitem__("fate", "gone"),
    "delivery without lost_in_failover": lambda r: r["tests"][1]["delivery"].pop("lost_in_failover"),
    "SLO without verdict": lambda r: r["tests"][1]["slos"][0].pop("ok"),
    "SLO with unknown comparison": lambda r: r["tests"][1]["slos"][0].__setitem__("comparison", "~"),
    "baseline result without regressed": lambda r: r["tests"][1]["baseline"]["results"][0].pop("regressed"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_reports_are_rejected(validator, report, name):
    rep = clone(report)
    BROKEN[name](rep)
    errors = list(validator.iter_errors(rep))
    assert errors, f"{name}: accepted"


def test_error_names_the_field(validator, report):
    rep = clone(report)
    _fault(rep)["figures"]["time_to_recover"] = "fast"
    err = jsonschema.exceptions.best_match(validator.iter_errors(rep))
    assert list(err.absolute_path)[-1] == "time_to_recover"
