"""No key, SAS signature or control token of a run reaches any output pytest makes.

The inner session is careless on purpose: it prints, logs, warns, records as properties and asserts on
every secret it gets, whole and in part, from test bodies and fixture teardowns. The inner conftest
writes the secrets to a file only this outer test reads; then every output of the run is searched for
any PIECE-long piece of any of them.
"""
from urllib.parse import quote

import pytest

from pytest_iotfailover import redaction as secrets

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.timeout(120)

CONFTEST = r'''
import logging, os, sys, warnings
from urllib.parse import unquote

import pytest
from pytest_iotfailover.sas import make_sas_token
from pytest_iotfailover.fakehub.control_api import ControlServer

log = logging.getLogger("careless")


def keep(*values):
    with open(os.environ["LEAK_RECORD"], "a") as f:
        for v in values:
            f.write(v + "\n")


def key_of(cs):
    return cs.split("SharedAccessKey=")[1].split(";")[0]


def leak(label, secret, record_property):
    print(f"{label} stdout {secret}")
    sys.stderr.write(f"{label} stderr {secret}\n")
    log.warning("%s log %s", label, secret)
    log.debug("%s partial %s", label, secret[3:27])
    log.info("%s dict %r", label, {"secret": secret, "bytes": secret.encode()})
    warnings.warn(f"{label} warning {secret}")
    warnings.warn(f"{label} partial warning {secret[-20:]}")
    record_property(f"{label}-str", secret)
    record_property(f"{label}-dict", {"secret": secret})
    record_property(f"{label}-bytes", secret.encode())


@pytest.fixture
def secrets_of_test(iothub, iothub_device, record_property):
    dev = iothub_device
    token = make_sas_token(f"{iothub.hostname}/devices/{dev.device_id}", dev.primary_key)
    control = ControlServer(iothub.fake)
    keep(dev.primary_key, dev.secondary_key, unquote(token.split("sig=")[1].split("&")[0]), control.token)
    found = {"cs": dev.connection_string, "key": dev.primary_key, "secondary": dev.secondary_key,
             "token": token, "control": control.token}
    yield found
    for label, secret in found.items():
        leak(f"teardown-{label}", secret, record_property)
'''

TESTS = r'''
import logging
import pytest
from conftest import keep, leak


@pytest.mark.parametrize("n", range(3))
def test_leaks_and_passes(secrets_of_test, record_property, record_testsuite_property, n):
    for label, secret in secrets_of_test.items():
        leak(label, secret, record_property)
        record_testsuite_property(f"suite-{label}-{n}", secret)


def test_compares_connection_strings(iothub, secrets_of_test):
    others = [iothub.add_device() for _ in range(3)]
    keep(*[d.primary_key for d in others], *[d.secondary_key for d in others])
    assert [d.connection_string for d in others] == [secrets_of_test["cs"]]


def test_compares_one_connection_string(secrets_of_test):
    cs = secrets_of_test["cs"]
    assert cs == cs[:-5] + "AAAA="


def test_compares_keys(secrets_of_test):
    assert secrets_of_test["key"] == secrets_of_test["secondary"]


def test_compares_connection_string_ending_in_key(secrets_of_test):
    # pytest shortens both sides to their first and last characters: the tail is the key's end
    assert secrets_of_test["cs"].split(";GatewayHostName=")[0] == "HostName=elsewhere"


def test_gives_up_with_key(secrets_of_test):
    pytest.xfail(f"no hub for {secrets_of_test['cs']}")


def test_compares_tokens(secrets_of_test):
    assert secrets_of_test["token"] * 2 == secrets_of_test["control"]


def test_raises_with_key(secrets_of_test):
    key, cs = secrets_of_test["key"], secrets_of_test["cs"]
    logging.getLogger("careless").error("failing: %s", cs, exc_info=ValueError(key))
    raise ValueError(f"cannot use {cs!r}")
'''


PIECE = 12  # README: this many characters of a secret in a row count as the secret


def _pieces(secret):
    for form in {secret, quote(secret, safe="")}:
        for i in range(len(form) - PIECE + 1):
            yield form[i:i + PIECE]


@pytest.mark.parametrize("extra", [[], ["-n", "2", "-v"]], ids=["serial", "xdist-verbose"])
def test_no_secret_of_the_run_reaches_any_output(pytester, monkeypatch, extra):
    record = pytester.path.parent / f"{pytester.path.name}-secrets.txt"
    monkeypatch.setenv("LEAK_RECORD", str(record))
    monkeypatch.delenv("IOTHUB_CONNECTION_STRING", raising=False)
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_leaky=TESTS)
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-rA", "--showlocals", "--log-cli-level=DEBUG", "--log-file=run.log",
        "--log-file-level=DEBUG", "--junitxml=out.xml", "-W", "always::UserWarning", *extra)
    result.assert_outcomes(passed=3, failed=6, xfailed=1)
    outputs = {"stdout": result.stdout.str(), "stderr": result.stderr.str(),
               "junit": (pytester.path / "out.xml").read_text()}
    if (pytester.path / "run.log").exists():  # under -n, whatever the controller and workers left there
        outputs["log file"] = (pytester.path / "run.log").read_text()
    kept = [s for s in record.read_text().split("\n") if s]
    assert len(kept) == 10 * 4 + 6, "every test's secrets were recorded"

    leaks = sorted({(name, piece) for s in kept for piece in _pieces(s)
                    for name, text in outputs.items() if piece in text})
    assert not leaks, (f"{len(leaks)} pieces of secrets leaked into {sorted({name for name, _ in leaks})}, "
                       f"e.g. {leaks[:3]}")

    # the outputs are there, only the secrets are gone
    assert "SharedAccessKey=<redacted>" in outputs["stdout"] and "sig=<redacted>" in outputs["stdout"]
    assert "teardown-control warning <redacted>" in outputs["stdout"]  # warnings summary
    assert "PASSED test_leaky.py::test_leaks_and_passes[2]" in outputs["stdout"]
    assert "XFAIL test_leaky.py::test_gives_up_with_key - no hub for HostName=" in outputs["stdout"]
    assert "key stdout <redacted>" in outputs["stdout"]  # -rA shows the passed tests' captured output
    assert 'name="cs-dict" value="{\'secret\': \'HostName=' in outputs["junit"]
    assert "&lt;redacted&gt;" in outputs["junit"]
    if not extra:
        assert 'name="suite-cs-0" value="HostName=' in outputs["junit"]  # record_testsuite_property
        assert "key log <redacted>" in outputs["stdout"]  # live log
        assert "key partial <redacted>" in outputs["log file"]


def test_redaction_rules():
    assert secrets.MIN_PARTIAL == PIECE
    key = "Zm9vYmFyYmF6cXV4cXV1eGZvb2JhcmJhenF1eHF1dXg="
    secrets.remember_device("rules-device", key)
    try:
        assert secrets.redact(f"x {key} y") == "x <redacted> y"
        assert secrets.redact(f"'{key[:24]}...'") == "'<redacted>...'"  # a truncated repr
        assert secrets.redact(f"...{key[-14:]}'") == "...<redacted>'"
        assert secrets.redact(quote(f"HostName=h;SharedAccessKey={key}", safe="")) == "<redacted>"
        assert secrets.redact(f"short {key[:11]} stays") == f"short {key[:11]} stays"
        assert secrets.redact("HostName=h.azure-devices.net;DeviceId=d;SharedAccessKey=abc") == \
            "HostName=h.azure-devices.net;DeviceId=d;SharedAccessKey=<redacted>"
        assert secrets.redact("sr=h%2Fdevices%2Fd&sig=abc%2Bdef&se=17") == "sr=h%2Fdevices%2Fd&sig=<redacted>&se=17"
        assert secrets.redact("...bc%2Bdef&se=17&skn=o") == "...<redacted>&se=17&skn=o"
        assert secrets.redact("Authorization: Bearer tok-123") == "Authorization: Bearer <redacted>"
        assert secrets.redact('{"control_token": "abc"}') == '{"control_token": "<redacted>"}'
        secrets.forget_device("rules-device")
        assert key[:20] not in secrets.redact(key), "a removed device's key stays hidden until released"
    finally:
        secrets.forget_device("rules-device")
        secrets.release_retired()
    assert secrets.redact(key) == key, "a released key is no longer looked for"


def test_only_live_device_keys_are_indexed():
    before = secrets.live_count()
    keys = [f"{i:04d}" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=" for i in range(200)]
    for i, key in enumerate(keys):
        secrets.remember_device(f"live-{i}", key)
    assert secrets.live_count() == before + 200
    for i in range(200):
        secrets.forget_device(f"live-{i}")
    secrets.release_retired()
    assert secrets.live_count() == before


def test_bench_redact_runs():
    # only that it runs and every key ends up hidden; the timings depend on the machine
    import os
    import subprocess
    import sys
    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "bench_redact.py")
    proc = subprocess.run([sys.executable, bench, "--size", "0.05", "--devices", "20,200"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if line.split()[:1] in (["20"], ["200"])]
    assert [(r[0], r[1], r[-1]) for r in rows] == [("20", "40", "yes"), ("200", "400", "yes")], proc.stdout


def test_hubview_keys_are_live_from_add_until_released():
    from pytest_iotfailover.backends.fake import FakeBackend
    from pytest_iotfailover.testing.view import HubView
    backend = FakeBackend("testhub")
    try:
        before = secrets.live_count()
        view = HubView(backend, "live-keys")
        devices = [view.add_device() for _ in range(5)]
        assert secrets.live_count() == before + 10  # primary and secondary keys
        assert all(secrets.redact(d.primary_key) == "<redacted>" for d in devices)
        view.close()
        assert secrets.redact(devices[0].secondary_key) == "<redacted>", "still hidden while the test reports"
        secrets.release_retired()
        assert secrets.live_count() == before
        assert secrets.redact(devices[0].primary_key) == devices[0].primary_key
    finally:
        backend.close()
