"""pytest wiring for pytest-iotfailover, the module of the `pytest11` entry point.

The hooks live in hooks.py and the fixtures in fixtures.py; this module only re-exports what
pytest looks for on the plugin module. Importing it loads no hub, SDK or certificate code.
"""
from .fixtures import (
                       _iothub_backend,
                       async_device_client,
                       device_client,
                       device_client_factory,
                       failover,
                       iothub,
                       iothub_device,
                       iothub_settings,
)
from .fleet import iothub_fleet
from .hooks import (
                       pytest_addoption,
                       pytest_collection_modifyitems,
                       pytest_configure,
                       pytest_exception_interact,
                       pytest_make_collect_report,
                       pytest_pycollect_makeitem,
                       pytest_runtest_call,
                       pytest_runtest_makereport,
                       pytest_runtest_protocol,
                       pytest_runtest_setup,
                       pytest_runtest_teardown,
                       pytest_sessionfinish,
                       pytest_sessionstart,
                       pytest_unconfigure,
                       pytest_warning_recorded,
)

__all__ = [
    "_iothub_backend", "async_device_client", "device_client", "device_client_factory", "failover", "iothub",
    "iothub_device", "iothub_fleet", "iothub_settings",
    "pytest_addoption", "pytest_collection_modifyitems", "pytest_configure", "pytest_exception_interact",
    "pytest_make_collect_report", "pytest_pycollect_makeitem", "pytest_runtest_call", "pytest_runtest_makereport",
    "pytest_runtest_protocol", "pytest_runtest_setup", "pytest_runtest_teardown", "pytest_sessionfinish",
    "pytest_sessionstart", "pytest_unconfigure", "pytest_warning_recorded",
]
