"""Checking a store end to end (verify) and keeping what can be read of a damaged one (repair)."""
