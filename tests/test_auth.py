import pytest

from pytest_iotfailover.iothub.auth import AuthError, parse_connection_string, parse_username, redact, verify_sas_token
from pytest_iotfailover.sas import make_sas_token

KEY = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="
HOST = "myhub.azure-devices.net"


def test_sas_token_matches_the_worked_example():
    token = make_sas_token(f"{HOST}/devices/dev1", KEY, expiry=1700000000)
    assert token == ("SharedAccessSignature sr=myhub.azure-devices.net%2Fdevices%2Fdev1"
                     "&sig=wosmA3uJK9T0mdB5CIYn%2BsAVA2ODflnucuvNO5S6mbM%3D&se=1700000000")


def test_signature_is_over_sr_exactly_as_sent():
    # lower-case escapes give another signature; the hub must not re-encode before checking
    token = ("SharedAccessSignature sr=myhub.azure-devices.net%2fdevices%2fdev1"
             "&sig=2D08zIheLai38c6CGbwOPcq8Z9hEFAOOWhm3BMXZJMY%3D&se=1700000000")
    t = verify_sas_token(token, hostname=HOST, device_id="dev1", keys=[KEY], now=1700000000)
    assert t.audience == f"{HOST}/devices/dev1"


@pytest.mark.parametrize("now, ok", [(1700000000 + 299, True), (1700000000 + 301, False)])
def test_expiry_has_five_minutes_of_grace(now, ok):
    token = make_sas_token(f"{HOST}/devices/dev1", KEY, expiry=1700000000)
    if ok:
        verify_sas_token(token, hostname=HOST, device_id="dev1", keys=[KEY], now=now)
    else:
        with pytest.raises(AuthError, match="expired"):
            verify_sas_token(token, hostname=HOST, device_id="dev1", keys=[KEY], now=now)


def test_audience_prefix_by_segment_only():
    token = make_sas_token(f"{HOST}/devices/dev", KEY, expiry=1700000000)
    with pytest.raises(AuthError, match="audience"):
        verify_sas_token(token, hostname=HOST, device_id="dev1", keys=[KEY], now=1700000000)
    hub_wide = make_sas_token(f"{HOST}/devices", KEY, expiry=1700000000)
    verify_sas_token(hub_wide, hostname=HOST, device_id="dev1", keys=[KEY], now=1700000000)


def test_wrong_key_is_rejected_without_showing_secrets():
    token = make_sas_token(f"{HOST}/devices/dev1", KEY, expiry=1700000000)
    other = "AAAA" + KEY[4:]
    with pytest.raises(AuthError) as info:
        verify_sas_token(token, hostname=HOST, device_id="dev1", keys=[other], now=1700000000)
    assert "signature" in str(info.value)
    assert KEY not in str(info.value) and "sig=" not in str(info.value)


def test_username_forms():
    u = parse_username(f"{HOST}/dev1/?api-version=2019-10-01&DeviceClientType=py%2F2.14")
    assert (u.hostname, u.device_id, u.module_id, u.api_version) == (HOST, "dev1", None, "2019-10-01")
    assert u.params["DeviceClientType"] == "py/2.14"
    legacy = parse_username(f"{HOST}/dev1/api-version=2016-11-14&DeviceClientType=c")
    assert legacy.api_version == "2016-11-14"
    with pytest.raises(AuthError):
        parse_username("nonsense")


def test_connection_string_parsing_and_redaction():
    cs = f"HostName={HOST};DeviceId=d;SharedAccessKey={KEY};GatewayHostName=127.0.0.1"
    assert parse_connection_string(cs)["GatewayHostName"] == "127.0.0.1"
    with pytest.raises(ValueError, match="unknown key 'Foo'"):
        parse_connection_string(cs + ";Foo=1")
    with pytest.raises(ValueError, match="repeats"):
        parse_connection_string(cs + ";DeviceId=e")
    assert KEY not in redact(cs) and "SharedAccessKey=<redacted>" in redact(cs)
    assert "sig=<redacted>" in redact(make_sas_token("x", KEY))


def test_username_with_question_mark_in_device_id_and_module_form():
    u = parse_username(f"{HOST}/?odd/?api-version=2019-10-01")
    assert (u.device_id, u.module_id) == ("?odd", None)
    m = parse_username(f"{HOST}/dev1/mod1/?api-version=2019-10-01")
    assert (m.device_id, m.module_id, m.api_version) == ("dev1", "mod1", "2019-10-01")


def test_malformed_segment_error_does_not_quote_the_key():
    for mangled, message in ((f"SharedAccessKey:{KEY}", "unknown key in segment 3"),
                             ("SharedAccessKey:MDEy", "segment 3 is not Key=value")):
        with pytest.raises(ValueError, match=message) as info:
            parse_connection_string(f"HostName={HOST};DeviceId=d;{mangled}")
        assert "MDEy" not in str(info.value)


@pytest.mark.parametrize("se", ["9" * 400, "1_700_000_000", "+1700000000", " 1700000000", "1e9", "", "1" * 13,
                                "١٧٠٠٠٠٠٠٠٠"])
def test_expiry_that_is_not_plain_digits_is_an_auth_error(se):
    # int() accepts all but the last two of these; a 400-digit expiry then overflowed the clock check
    token = f"SharedAccessSignature sr=myhub.azure-devices.net%2Fdevices%2Fdev1&sig=x&se={se}"
    with pytest.raises(AuthError, match="'se'"):
        verify_sas_token(token, hostname=HOST, device_id="dev1", keys=[KEY], now=1700000000)


@pytest.mark.parametrize("sig", ["%C3%A9t%C3%A9", "%FF%FE", "\u00e9", "", "A" * 60000])
def test_any_signature_text_is_a_plain_mismatch(sig):
    # hmac.compare_digest raises TypeError on non-ASCII str; the token's text is the peer's choice
    token = f"SharedAccessSignature sr=myhub.azure-devices.net%2Fdevices%2Fdev1&sig={sig}&se=1700000000"
    with pytest.raises(AuthError, match="signature does not match"):
        verify_sas_token(token, hostname=HOST, device_id="dev1", keys=[KEY], now=1700000000)


def test_far_future_expiry_within_twelve_digits_is_accepted():
    token = make_sas_token(f"{HOST}/devices/dev1", KEY, expiry=999999999999)
    assert verify_sas_token(token, hostname=HOST, device_id="dev1", keys=[KEY], now=1700000000).expiry == 999999999999
