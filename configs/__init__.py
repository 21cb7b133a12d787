"""Experiment configs: one `get_config(arg)` per file, loaded by path through ml_collections."""
