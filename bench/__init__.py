"""Benchmarks of crepe: ``.venv/bin/python -m bench.<name> [--quick]`` from the repository root.

Each script prints a markdown table and (full mode, or ``--write``) updates its own section of
``docs/benchmarks.md``. Targets are ratios measured side by side in one run, never timed tests.
"""
