"""Benchmarks: ``python -m bench [NAME ...]`` (see ``bench/__main__.py``).

A benchmark is a module in this package with ``run() -> list[tuple[str, float,
str]]`` (name, value, unit), listed in ``bench.__main__.BENCHMARKS``. It runs
after Django is set up on a throwaway, migrated database.
"""
