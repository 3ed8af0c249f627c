"""Helpers shared by the test suites: real servers the integration tests talk to."""
