"""Test helpers that need no pytest: the per-test hub view, the failover trigger, delivery assertions."""
