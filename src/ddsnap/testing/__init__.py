"""Test rigs that the tests and the benchmark share (not used by the server)."""
