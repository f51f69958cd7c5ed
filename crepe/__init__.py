"""crepe: post-training pruning of LLMs with CRePE, RIA, Wanda and magnitude scores.

Public API (pure library: torch and transformers; never prefect, mlflow or dvc):

- ``load_model(spec, dtype, device)``: ``embedded:smollm2-135m``, ``embedded:gemma3-270m``, a hub
  id or a local folder;
- ``score(method, weight, act_norm, **params)`` and the ``SCORERS`` registry;
- ``neighborhood_sum(abs_weight, kernel_size)``: CRePE's cross-excluding K x K window sum;
- ``select_mask(scores, sparsity=None, pattern=None, group="layer")``: bool keep-masks;
- ``prune_model(model, calib_ids, PruneConfig(...))``: sequential layer-wise pruning; methods are
  the scorers plus SparseGPT (``crepe.methods``), with optional refinement (``refine="cp"|"lsa"|
  "dsnot"|"r2-dsnot"``) and per-block sparsity (``allocation="owl"|"alpha"|"dlp"`` or
  ``block_sparsity=[...]``);
- ``perplexity(model, input_ids, seqlen, max_windows)``: the WikiText-2 protocol;
- ``data.get_calibration`` / ``data.get_eval_tokens``: seeded C4 windows and WikiText-2 tokens.
"""

from crepe import data
from crepe.errors import CrepeError
from crepe.evaluate import PerplexityResult, perplexity
from crepe.masks import measure_sparsity, nm_groups_valid, select_mask
from crepe.models import DEFAULT_MODEL, LoadedModel, ModelInfo, load_model
from crepe.neighborhood import neighborhood_sum
from crepe.pruner import PruneConfig, PruneReport, prune_model
from crepe.scoring import SCORERS, get_scorer, register_scorer, score
from crepe.types import NMPattern, SparsitySpec, parse_sparsity

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "SCORERS",
    "CrepeError",
    "LoadedModel",
    "ModelInfo",
    "NMPattern",
    "PerplexityResult",
    "PruneConfig",
    "PruneReport",
    "SparsitySpec",
    "__version__",
    "data",
    "get_scorer",
    "load_model",
    "measure_sparsity",
    "neighborhood_sum",
    "nm_groups_valid",
    "parse_sparsity",
    "perplexity",
    "prune_model",
    "register_scorer",
    "score",
    "select_mask",
]
