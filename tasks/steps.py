"""The pipeline's steps, by name: the one registry behind ``crepe pipeline --until STEP`` and ``--export``.

Each entry names the task module that computes the step and what ``--export PATH`` writes for it (None: the
step cannot be exported; the release has its own folder, ``release.out_dir``). A new stage is one task
module, one line here and one call in :mod:`flows.pipeline`.
"""

from __future__ import annotations

from dataclasses import dataclass

from crepe.registry import Registry
from tasks.pho import PHO_FILE
from tasks.verify import PRUNE_MANIFEST


@dataclass(frozen=True)
class Step:
    """What ``--export PATH`` writes after ``--until STEP`` (``kind``: "folder" or "file"; None: nothing),
    and the file that marks a folder as an earlier export of the step (so it may be replaced)."""

    export: str | None = None
    kind: str | None = None
    marker: str | None = None


STEPS = Registry("pipeline step")
STEPS.register("search", "PHO: proxy screening, top-k verification by perplexity, the winner (tasks.pho)",
               obj=Step("a folder with pho.json and search.json", "folder", PHO_FILE))
STEPS.register("prune", "the final prune with the winner (or prune.params), refinements in the loop (tasks.prune)",
               obj=Step("the pruned Hugging Face folder with crepe_manifest.json", "folder", PRUNE_MANIFEST))
STEPS.register("evaluate", "perplexity and zero-shot accuracy of the pruned folder (tasks.evaluate)",
               obj=Step("a metrics JSON file", "file"))
STEPS.register("release", "the release folder, its model card and manifest, MLflow and the registry (tasks.publish)",
               obj=Step())
EXPORT_STEPS: tuple[str, ...] = tuple(name for name, entry in STEPS.items() if entry.obj.export)
