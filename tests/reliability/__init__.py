"""Helpers for the reliability tests (tests/test_reliability.py, tests/test_security.py)."""
