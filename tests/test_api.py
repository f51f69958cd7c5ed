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
        "import sys, crepe, crepe.search, crepe.run, crepe.registry, crepe.search.context; "
        "bad = sorted({m.split('.')[0] for m in sys.modules} & {'prefect', 'mlflow', 'dvc', 'transformers'}); "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == ""


def test_layers_import_downward_only():
    """crepe/ imports neither tasks/ nor flows/; tasks/ never imports flows/; flows/ never talks to MLflow
    itself (statically, any depth)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    forbidden = {"crepe": ("tasks", "flows", "prefect", "mlflow", "dvc"), "tasks": ("flows",), "flows": ("mlflow",)}
    bad = []
    for package, banned in forbidden.items():
        for file in sorted((root / package).rglob("*.py")):
            for node in ast.walk(ast.parse(file.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
                bad += [f"{file.relative_to(root)}: {n}" for n in names if n.split(".")[0] in banned]
    assert bad == []


PACKAGES = ("crepe", "tasks", "flows")
MAX_LINES = 420  # "about 400"


def _modules() -> list[Path]:
    root = Path(__file__).resolve().parent.parent
    return [f for package in PACKAGES for f in sorted((root / package).rglob("*.py"))]


def test_every_module_says_what_it_owns_and_stays_small():
    import ast

    root = Path(__file__).resolve().parent.parent
    problems = []
    for file in _modules():
        text = file.read_text()
        if file.name != "__init__.py" or text.strip():
            if not ast.get_docstring(ast.parse(text)):
                problems.append(f"{file.relative_to(root)}: no module docstring")
        if len(text.splitlines()) > MAX_LINES:
            problems.append(f"{file.relative_to(root)}: {len(text.splitlines())} lines")
    assert problems == []


def test_imports_inside_functions_say_why():
    """Imports sit at module top; one inside a function is heavy and optional (or breaks a cycle) and says so
    in a comment on its line or the line above."""
    import ast

    root = Path(__file__).resolve().parent.parent
    unexplained = []
    for file in _modules():
        lines = file.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    here, above = lines[inner.lineno - 1], lines[inner.lineno - 2].strip()
                    if "#" not in here and not above.startswith("#"):
                        unexplained.append(f"{file.relative_to(root)}:{inner.lineno}: {here.strip()}")
    assert unexplained == []


def test_cli_choices_and_crepe_methods_read_the_registries(capsys):
    """One registry per axis feeds the CLI's choices and `crepe methods`."""
    import json

    from crepe.allocation import ALLOCATORS
    from crepe.methods import all_methods
    from crepe.refine import REFINES
    from crepe.search.proxies import PROXY_NAMES
    from crepe.search.samplers import SAMPLERS
    from crepe.updates import UPDATES
    from crepe.zeroshot import TASKS
    from flows.cli import build_parser, main
    from tasks.steps import STEPS

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices  # noqa: SLF001 - argparse's own table
    choices = {a.dest: a.choices for a in sub["prune"]._actions if a.choices}  # noqa: SLF001
    assert list(choices["method"]) == list(all_methods())
    assert list(choices["refine"]) == list(REFINES) and list(choices["allocation"]) == list(ALLOCATORS)
    assert list(next(a for a in sub["search"]._actions if a.dest == "sampler").choices) == list(SAMPLERS)  # noqa: SLF001
    assert list(next(a for a in sub["pipeline"]._actions if a.dest == "until").choices) == list(STEPS)  # noqa: SLF001
    assert main(["methods", "--json"]) == 0
    tables = json.loads(capsys.readouterr().out)
    names = {title.split(" (")[0]: [row["name"] for row in rows] for title, rows in tables.items()}
    assert names == {"methods": list(all_methods()), "weight updates": list(UPDATES), "refinements": list(REFINES),
                     "allocations": list(ALLOCATORS),
                     "samplers": list(SAMPLERS), "proxies": list(PROXY_NAMES), "zero-shot tasks": list(TASKS),
                     "pipeline steps": list(STEPS)}


def test_docs_registry_tables_are_generated_from_the_registries():
    from flows.cli_prune import registries_markdown

    doc = (Path(__file__).resolve().parent.parent / "docs" / "methods.md").read_text()
    section = doc.split("<!-- registries:start -->\n", 1)[1].split("<!-- registries:end -->", 1)[0]
    assert section == registries_markdown(), "regenerate it: crepe methods --markdown"
