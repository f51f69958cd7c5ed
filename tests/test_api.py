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


def test_layers_import_downward_only():
    """crepe/ imports neither tasks/ nor flows/; tasks/ never imports flows/ (statically, any depth)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    forbidden = {"crepe": ("tasks", "flows", "prefect", "mlflow", "dvc"), "tasks": ("flows",)}
    bad = []
    for package, banned in forbidden.items():
        for file in sorted((root / package).rglob("*.py")):
            for node in ast.walk(ast.parse(file.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
                bad += [f"{file.relative_to(root)}: {n}" for n in names if n.split(".")[0] in banned]
    assert bad == []
