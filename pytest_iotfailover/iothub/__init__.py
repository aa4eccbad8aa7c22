"""IoT Hub's device protocol, sans-IO: MQTT codec, SAS auth, topics, sessions, the hub core and its
stores. Standard library, `model` and `errors` only: no sockets, event loops, threads or wall clock."""
