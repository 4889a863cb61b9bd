"""Launching many research.train runs: grid sweeps over flags and seeds (`python -m launch.sweep`)."""
