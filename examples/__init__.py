"""Embedded example data: a deterministic synthetic catalogue and users (see synthetic.py)."""
