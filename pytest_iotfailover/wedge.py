"""Moved to `pytest_iotfailover.devices.wedge`; this name keeps older imports working."""
from .devices.wedge import *
from .devices.wedge import DEAD_THREAD_GRACE, device_id_of, hub_disagrees  # noqa: F401
from .wedge_findings import findings, record  # noqa: F401
