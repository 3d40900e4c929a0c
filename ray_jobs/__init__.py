"""Thin Ray entrypoints around the speed library. Module names equal phase names."""
