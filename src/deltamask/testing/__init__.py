"""Hostile payloads and faults for tests and benchmarks; never part of a run's algorithm."""
