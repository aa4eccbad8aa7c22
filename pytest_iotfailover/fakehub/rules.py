"""Rules for the embedded hub's settings that the plugin applies while it parses its options, in
runs that may never make a hub: only the standard library here (tests/test_plugin_start.py)."""
import re

__all__ = ["HUB_NAME"]

# IoT Hub names: 3-50 letters, digits and hyphens, not ending in a hyphen, by Azure's resource
# naming rules for Microsoft.Devices/IotHubs (not re-checked here); starting with a letter or digit
# and lower case only are this project's assumptions (the name is the first label of a host name)
HUB_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{1,48}[a-z0-9])$")
