"""Tuning: the tuner, timing, correctness checks, the database and the ``mlxp-tune`` CLI."""
