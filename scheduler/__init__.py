"""Corral's scheduler: the pure engine, the simulator that drives it, and the CLI."""
