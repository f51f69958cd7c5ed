"""The public API the README documents, and the layering rule: ``import crepe`` stays a pure library."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import crepe

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example_uses_only_public_names():
    snippet = README.read_text().split("```python", 1)[1].split("```", 1)[0]
    used = set(re.findall(r"crepe\.([a-zA-Z_]+(?:\.[a-zA-Z_]+)?)", snippet))
    assert used, "the README example disappeared"
    for dotted in used:
        obj = crepe
        for part in dotted.split("."):
            assert hasattr(obj, part), f"README uses crepe.{dotted}, which does not exist"
            obj = getattr(obj, part)


def test_import_crepe_pulls_in_no_orchestration_or_transformers():
    code = (
        "import sys, crepe, crepe.search, crepe.jobs; "
        "bad = sorted({m.split('.')[0] for m in sys.modules} & {'prefect', 'mlflow', 'dvc', 'transformers'}); "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == ""
