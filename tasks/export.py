"""``crepe pipeline --until STEP --export PATH``: a step's result copied out of the work folder (the DVC
stages' outputs), atomically (a temp sibling renamed into place: an interrupted export leaves the previous
one intact). search -> a folder with ``pho.json`` (what ``crepe prune --params-from`` reads) and
``search.json``; prune -> the pruned HF folder with its manifest (checked against the cached content
hash); evaluate -> the metrics JSON.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from crepe.errors import CrepeError
from crepe.io import atomic_dir, sha256_file, sha256_folder, write_json_atomic
from tasks.pho import PHO_FILE, SEARCH_FILE
from tasks.steps import EXPORT_STEPS, STEPS


def check_export(step: str, path: str | Path) -> Path:
    """The absolute path ``crepe pipeline --until STEP --export PATH`` may write, else a CrepeError in one
    sentence: search and prune write a folder (new, empty, or an earlier export of the same step, which is
    replaced), evaluate a JSON file. Checked before the flow starts and again when exporting."""
    if step not in EXPORT_STEPS:
        raise CrepeError(f"--export applies to --until {', '.join(EXPORT_STEPS)}; --until {step} has nothing to "
                         "export" + (" (its folder is release.out_dir: -S release.out_dir=PATH)" if step == "release"
                                     else ""))
    target = Path(path).expanduser().absolute()
    blocker = next((p for p in target.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise CrepeError(f"--export {path} cannot be written: {blocker} is a file, not a folder")
    if step == "evaluate":
        if target.is_dir():
            raise CrepeError(f"--export {path} is a folder; --until evaluate writes a JSON file such as "
                             "data/metrics/eval.json")
        return target
    if target.exists() and not target.is_dir():
        raise CrepeError(f"--export {path} is a file; --until {step} writes a folder")
    marker = STEPS[step].obj.marker
    if target.is_dir() and any(target.iterdir()) and not (target / marker).is_file():
        raise CrepeError(f"--export {path} is a non-empty folder without {marker}, so not an earlier --until {step} "
                         "export; remove it or choose another path")
    return target


def _copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, dirs_exist_ok=True)


def _cached_file(path: str | Path, sha256: str | None = None) -> Path:
    file = Path(path)
    if not file.is_file() or (sha256 is not None and sha256_file(file) != sha256):
        raise CrepeError(f"the cached result {file} is missing or changed; rerun with --refresh to rebuild it")
    return file


def no_search_summary(cfg: Any) -> dict[str, Any]:
    """The ``pho.json`` of a search step with ``pho.enabled: false``: no search ran, the prune uses
    ``prune.params`` (``crepe prune --params-from`` reads them from ``params``)."""
    return {"kind": "pho", "enabled": False, "winner": None, "params": dict(cfg.prune.params),
            "config": {"model": cfg.model.spec, "method": cfg.prune.method, "sparsity": cfg.prune.sparsity},
            "note": "pho.enabled is false: no search ran; the prune uses prune.params"}


def evaluation_metrics(evaluation: Mapping[str, Any], pruned: Mapping[str, Any]) -> dict[str, Any]:
    """The metrics JSON of ``--until evaluate --export``: ``perplexity`` (and ``zero_shot``) as ``crepe eval
    --json`` writes them, the achieved sparsity and the pruned folder's content hash; no timings."""
    out: dict[str, Any] = {"perplexity": dict(evaluation["ppl"]),
                           "sparsity": pruned["report"]["overall_sparsity"], "pruned_sha256": pruned["sha256"]}
    if "zero_shot" in evaluation:
        out["zero_shot"] = evaluation["zero_shot"]
    return out


@task(name="export", cache_policy=NO_CACHE)
def export(cfg: Any, step: str, path: str, search: dict[str, Any] | None = None, pruned: dict[str, Any] | None = None,
           evaluation: dict[str, Any] | None = None) -> str:
    """Write the result of ``step`` to ``path``, atomically (a temp sibling renamed into place: an interrupted
    export leaves the previous one intact): search -> a folder with ``pho.json`` (what ``crepe prune
    --params-from`` reads) and ``search.json``; prune -> a copy of the pruned HF folder with its manifest
    (checked against the cached content hash); evaluate -> the metrics JSON (:func:`evaluation_metrics`)."""
    target = check_export(step, path)
    if step == "search":
        with atomic_dir(target, overwrite=True) as tmp:
            if search is None:
                write_json_atomic(tmp / PHO_FILE, no_search_summary(cfg))
            else:
                shutil.copyfile(_cached_file(search["pho_json"]), tmp / PHO_FILE)
                shutil.copyfile(_cached_file(search["path"], search["sha256"]), tmp / SEARCH_FILE)
    elif step == "prune":
        assert pruned is not None
        src = Path(pruned["path"])
        if not src.is_dir():
            raise CrepeError(f"the cached pruned model {src} is missing; rerun with --refresh to rebuild it")
        with atomic_dir(target, overwrite=True) as tmp:
            _copy_tree(src, tmp)
            if sha256_folder(tmp) != pruned["sha256"]:
                raise CrepeError(f"the cached pruned model {src} changed since it was written; rerun with --refresh")
    else:
        assert evaluation is not None and pruned is not None
        write_json_atomic(target, evaluation_metrics(evaluation, pruned))
    return str(target)
