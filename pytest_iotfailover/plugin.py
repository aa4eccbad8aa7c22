"""pytest wiring for pytest-iotfailover: options, markers and fixtures live here, logic elsewhere."""
