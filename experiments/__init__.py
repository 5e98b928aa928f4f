"""Experiment recipes: `python -m experiments.run --config=NAME` (arrives with the trainer)."""
