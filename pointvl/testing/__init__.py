"""Test fixtures and tiny models, used by the tests, the demo and the benchmarks."""
