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

The step registry is :data:`tasks.steps.STEPS`; this module gathers the tasks for the flows. A new stage is
one task module, one line in :mod:`tasks.steps` and one call in :mod:`flows.pipeline`.
"""

from __future__ import annotations

from tasks.evaluate import evaluate, evaluate_folder, perplexity_of
from tasks.export import check_export, evaluation_metrics, export, no_search_summary
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
from tasks.steps import EXPORT_STEPS, STEPS, Step

__all__ = [
    "CALIB_FILE", "EXPORT_STEPS", "PHO_FILE", "PRUNE_MANIFEST", "SEARCH_FILE", "STEPS", "WORK_ENV", "Step",
    "calibration_windows", "check_export", "choose_winner", "code_version", "compute_identity", "content_key",
    "evaluate", "evaluate_candidate", "evaluate_folder", "evaluation_metrics", "export", "final_prune", "lineage",
    "no_search_summary", "perplexity_of", "pho_screen", "prune_to_folder", "refine", "release",
    "release_is_current", "resolve_inputs", "run_metrics", "search_summary", "strip_paths", "track",
    "verify_candidate", "weight_selection", "work_dir",
]
