"""Shared fixtures: paths to the real data in ../shared, temporary data trees, and servers on loopback."""
