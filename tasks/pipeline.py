"""The pipeline's stages, by name: one registry of steps over the task modules.

Every stage is a plain function plus its Prefect ``@task`` wrapper in its own module, cached by a content
key (:mod:`tasks.keys`) and exchanging paths, content hashes and small dicts only:

====================  ==========================  =====================================================
step (``--until``)    tasks                       writes
====================  ==========================  =====================================================
inputs                :mod:`tasks.inputs`         ``<work>/calibration/<key>/calibration.pt``
search                :mod:`tasks.pho`            ``<work>/search/<key>/{state,trials,search,pho}.json``
prune                 :mod:`tasks.prune`          ``<work>/pruned/<key>/`` (HF folder + crepe_manifest.json)
evaluate              :mod:`tasks.evaluate`       nothing (a JSON-clean result)
release               :mod:`tasks.publish`        ``release.out_dir`` and the MLflow run
====================  ==========================  =====================================================

A new stage is one task module, one registry line here and one call in :mod:`flows.pipeline`.
"""

from __future__ import annotations

from dataclasses import dataclass

from crepe.registry import Registry
from tasks.evaluate import evaluate, evaluate_folder, perplexity_of
from tasks.export import EXPORT_STEPS, check_export, evaluation_metrics, export, no_search_summary
from tasks.inputs import CALIB_FILE, calibration_windows, compute_identity, resolve_inputs, weight_selection
from tasks.keys import WORK_ENV, code_version, content_key, strip_paths, work_dir
from tasks.pho import (
    PHO_FILE,
    SEARCH_FILE,
    choose_winner,
    evaluate_candidate,
    pho_screen,
    search_summary,
    verify_candidate,
)
from tasks.prune import MANIFEST as PRUNE_MANIFEST
from tasks.prune import final_prune, prune_to_folder, refine
from tasks.publish import lineage, release, release_is_current, run_metrics, track


@dataclass(frozen=True)
class Step:
    """What ``--until STEP`` stops after, and what ``--export PATH`` then writes (None: no export)."""

    export: str | None


STEPS = Registry("pipeline step")
STEPS.register("search", "PHO: proxy screening, top-k verification by perplexity, the winner (tasks.pho)",
               obj=Step("a folder with pho.json and search.json"))
STEPS.register("prune", "the final prune with the winner (or prune.params), refinements in the loop (tasks.prune)",
               obj=Step("the pruned Hugging Face folder with crepe_manifest.json"))
STEPS.register("evaluate", "perplexity and zero-shot accuracy of the pruned folder (tasks.evaluate)",
               obj=Step("a metrics JSON file"))
STEPS.register("release", "the release folder, its model card and manifest, MLflow and the registry (tasks.publish)",
               obj=Step(None))

__all__ = [
    "CALIB_FILE", "EXPORT_STEPS", "PHO_FILE", "PRUNE_MANIFEST", "SEARCH_FILE", "STEPS", "WORK_ENV", "Step",
    "calibration_windows", "check_export", "choose_winner", "code_version", "compute_identity", "content_key",
    "evaluate", "evaluate_candidate", "evaluate_folder", "evaluation_metrics", "export", "final_prune", "lineage",
    "no_search_summary", "perplexity_of", "pho_screen", "prune_to_folder", "refine", "release",
    "release_is_current", "resolve_inputs", "run_metrics", "search_summary", "strip_paths", "track",
    "verify_candidate", "weight_selection", "work_dir",
]
