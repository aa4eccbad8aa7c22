"""The embedded FakeHub behind the `Hub` interface."""
from collections.abc import Collection, Sequence
from typing import Any

from ..fakehub.hub import FakeHub
from ..fakehub.shaping import BULK_REGISTRY_LIMIT
from ..iothub.events import HubEvent
from ..iothub.ledger import Telemetry
from ..model import FaultKind, FaultSpec, Support, check_support
from .base import Hub

HUB = "the embedded hub"
# The embedded hub is where the vocabulary comes from: it honours every kind and parameter.
SUPPORT = {kind: Support.everything(kind) for kind in FaultKind}


class FakeBackend(Hub):
    kind = "fake"

    def __init__(self, hub_name: str = "testhub", *, throttle_setup: bool = False, **fakehub_kwargs: Any):
        # the test's devices are set-up, an import job outside the registry throttle, unless
        # --iothub-throttle-setup counts them as registry operations (fakehub/shaping.py)
        self.throttle_setup = throttle_setup
        self.fakehub = FakeHub(hub_name, **fakehub_kwargs).start()
        self.hostname = self.fakehub.hostname
        self.ca_pem = self.fakehub.ca_pem

    def create_device(self, device_id):
        return self.fakehub.add_device(device_id, throttle=self.throttle_setup)

    def create_devices(self, device_ids: Sequence[str]) -> list[Any]:
        """Many identities at once: bulk registry calls of at most 100 when they are counted
        (--iothub-throttle-setup), so the set-up waits once per 100 rather than per device; one
        import-job call otherwise. All or none: on a refusal the ones made so far are removed."""
        ids = list(device_ids)
        step = BULK_REGISTRY_LIMIT if self.throttle_setup else max(len(ids), 1)
        made: list[Any] = []
        try:
            for start in range(0, len(ids), step):
                made += self.fakehub.add_devices(ids[start:start + step], throttle=self.throttle_setup)
        except BaseException:
            for dev in made:
                self.fakehub.remove_device(dev.device_id, throttle=False)  # undone as set-up, uncounted
            raise
        return made

    def delete_device(self, device_id):
        if self.fakehub.registry.get(device_id) is not None:
            self.fakehub.remove_device(device_id, throttle=self.throttle_setup)

    def telemetry(self, device_ids: Collection[str] | None = None, *, include_lost: bool = False) -> list[Telemetry]:
        # by the ledger's device index: a test's query costs its own devices' messages only
        return self.fakehub.telemetry(device_ids=device_ids, include_lost=include_lost)

    def wait_until(self, predicate, timeout):
        return self.fakehub.ledger.wait_until(predicate, timeout)

    def events(self, device_ids: Collection[str] | None = None) -> list[HubEvent]:
        evs = self.fakehub.events
        if device_ids is None:
            return evs
        wanted = set(device_ids)
        return [e for e in evs if e.device_id in wanted]

    def send_c2d(self, device_id, body, properties=None, *, ttl=None, expiry_time=None, ack=None):
        return self.fakehub.send_c2d(device_id, body, properties, ttl=ttl, expiry_time=expiry_time, ack=ack)

    def feedback(self, device_ids: Collection[str] | None = None) -> list[Any]:
        records = self.fakehub.feedback()
        if device_ids is None:
            return records
        wanted = set(device_ids)
        return [r for r in records if r.device_id in wanted]

    def invoke_method(self, device_id, method_name, payload=None, timeout=30.0):
        return self.fakehub.invoke_method(device_id, method_name, payload, timeout)

    def get_twin(self, device_id):
        return self.fakehub.get_twin(device_id)

    def update_desired(self, device_id, patch):
        return self.fakehub.update_desired(device_id, patch)

    def start_fault(self, spec: FaultSpec):
        check_support(spec, SUPPORT, HUB)
        return self.fakehub.faults.start(spec)

    def fault_mark(self):
        return len(self.fakehub.faults.history()) if self.fakehub.running else 0

    def end_faults_since(self, mark):
        if not self.fakehub.running:
            return []
        handles = self.fakehub.faults.history()[mark or 0:]
        for h in handles:
            if h.state in ("pending", "active"):
                h.cancel()
        return handles

    def close(self):
        self.fakehub.stop()
