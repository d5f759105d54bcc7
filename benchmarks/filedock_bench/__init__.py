"""Benchmarks of filedock against the raw limit and older designs; run through ``benchmarks/run.py``."""
