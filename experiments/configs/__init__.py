"""Experiment configs: `get_config(arg=None)` returning an ml_collections ConfigDict."""
