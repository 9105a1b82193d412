"""Benchmark clients that ship with the package (so they run inside the container too)."""
