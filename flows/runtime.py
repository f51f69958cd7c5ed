"""Prefect's environment for crepe commands: an isolated Prefect home and result storage per project.

Unless already set, ``crepe pipeline`` / ``transfer`` / ``schedule`` use

- ``PREFECT_HOME=<project>/.prefect`` (the ephemeral server's database and settings stay with the
  project rather than in ``~/.prefect``, shared with other Prefect projects);
- ``PREFECT_LOCAL_STORAGE_PATH=<project>/.prefect/storage`` (persisted task results: the cache that
  survives processes and crashes; delete it to forget every cached task);
- ``PREFECT_SERVER_ANALYTICS_ENABLED=false`` and a 90 s ephemeral-server startup timeout.

Set any of them yourself (e.g. ``PREFECT_API_URL`` for a real Prefect server) and it wins. The work
folder of the tasks' artifacts is ``$CREPE_WORK_DIR``, else ``<project>/.crepe/work``.
"""

from __future__ import annotations

import os
from pathlib import Path


def prefect_env(project_root: str | Path) -> dict[str, str]:
    """Set the defaults above (only keys not already in the environment); return what is in effect."""
    root = Path(project_root).resolve()
    home = Path(os.environ.get("PREFECT_HOME") or root / ".prefect")
    defaults = {
        "PREFECT_HOME": str(home),
        "PREFECT_LOCAL_STORAGE_PATH": str(home / "storage"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    return {k: os.environ[k] for k in defaults}
