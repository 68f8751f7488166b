"""Scaling out: shards of one extraction, run by hand, as a job array or on Ray."""
