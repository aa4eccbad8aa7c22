#!/usr/bin/env python3
"""What the hub's nap does to devices that each wait on their PUBACK before sending again.

A few unmodified sync `IoTHubDeviceClient`s, one device each, call `send_message` in a loop, all at
once, against an embedded FakeHub; for each nap setting this prints the messages per second each
client reached. Such senders send once per nap whatever its length, so a nap longer than what it
can gather only slows them (fakehub/nap.py, `nap_for`). This is a script, not a test: it prints
figures and exits 0 unless something broke. bench/README.md, "A longer nap where it gathers more",
has the figures.
"""
import argparse
import logging
import os
import statistics
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # a source checkout works without installing

from azure.iot.device import IoTHubDeviceClient, Message

from pytest_iotfailover.fakehub import FakeHub
from pytest_iotfailover.fakehub.nap import STORM_QUIET


def _seconds_list(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated seconds, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated seconds of 0 or more, got {text!r}")
    return values


def run(nap: float, clients: int, messages: int, tier: str | None) -> list[float]:
    """Messages per second of each client, all sending `messages` at once."""
    with FakeHub("senders", nap=nap, tier=tier) as hub:
        devices = [hub.add_device(f"sender-{i}") for i in range(clients)]
        sdk = [IoTHubDeviceClient.create_from_connection_string(d.connection_string,
                                                                server_verification_cert=hub.ca_pem)
               for d in devices]
        try:
            for client in sdk:
                client.connect()
            # the hub does not nap within STORM_QUIET of a new connection; measure the steady state
            time.sleep(STORM_QUIET + 0.2)
            rates: list[float] = [0.0] * clients
            start = threading.Barrier(clients)

            def send(index: int) -> None:
                start.wait()
                began = time.perf_counter()
                for n in range(messages):
                    sdk[index].send_message(Message(f"{index}-{n}"))
                rates[index] = messages / (time.perf_counter() - began)
            threads = [threading.Thread(target=send, args=(i,)) for i in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            for client in sdk:
                client.shutdown()
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--naps", type=_seconds_list, default=[0.0, 0.005, 0.02],
                        help="the hub's nap settings to compare, seconds, comma-separated")
    parser.add_argument("--clients", type=int, default=2, help="SDK clients sending at once")
    parser.add_argument("--messages", type=int, default=200, help="messages each client sends")
    parser.add_argument("--tier", default="none", help="IoT Hub tier the hub throttles as, or none")
    args = parser.parse_args()
    if args.clients < 1 or args.messages < 1:
        parser.error("--clients and --messages must be at least 1")
    tier = None if args.tier.lower() == "none" else args.tier
    logging.getLogger("azure.iot.device").setLevel(logging.CRITICAL)
    print(f"{args.clients} SDK clients, {args.messages} send_message each at once, tier {args.tier}")
    print(f"{'nap setting':>12}  {'msgs/s per client (median, min-max)':>36}")
    for nap in args.naps:
        rates = run(nap, args.clients, args.messages, tier)
        print(f"{nap * 1000:>9.1f} ms  {statistics.median(rates):>14.0f} ({min(rates):.0f}-{max(rates):.0f})")


if __name__ == "__main__":
    main()
