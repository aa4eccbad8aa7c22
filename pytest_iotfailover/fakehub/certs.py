"""A throw-away certificate authority and server certificate for the fake hub."""
import ssl
from collections.abc import Sequence

import trustme


def client_context(ca_pem: str) -> ssl.SSLContext:
    """What a device SDK builds: TLS 1.2+, verified, hostname checked, trusting only `ca_pem`.

    Not `ssl.create_default_context()`: without a CA of its own that also loads the system's CA
    store, about 40 ms per context, which made a test opening 250 raw connections take 12 s, long
    enough under load for the hub's 30 s CONNECT timeout to close the first of them."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cadata=ca_pem)
    return ctx


class HubCertificates:
    """One CA per hub; the server certificate names every host a client may dial."""

    def __init__(self, names: Sequence[str]):
        self.ca = trustme.CA(organization_name="pytest-iotfailover test CA")
        self.names = list(dict.fromkeys(names))
        self.server_cert = self.ca.issue_cert(*self.names)
        self.ca_pem = self.ca.cert_pem.bytes().decode("ascii")

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.options |= ssl.OP_NO_COMPRESSION
        self.server_cert.configure_cert(ctx)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        return client_context(self.ca_pem)
