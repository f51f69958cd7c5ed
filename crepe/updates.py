"""The weight-update axis (``prune.update``, ``--update``): what happens to the kept weights after the mask.

The mask always comes from the method (a scorer's score, after CP/LSA and DSnoT if configured); the
update only rewrites the weights the mask keeps:

- ``none``: the mask only; pruned weights are set to zero, the rest are left unchanged;
- ``obs``: fixed-mask OBS reconstruction, SparseGPT's column sweep (:func:`crepe.sparsegpt.obs_update`)
  with the scorer's mask: the damped input Hessian of the dense block, column blocks of ``blocksize``,
  the same damping retries. It needs calibration data, so a magnitude prune with ``obs`` calibrates too.
  ``guard`` (default on) keeps, per output row, the plain masked weights where the greedy sweep would
  give a larger output error on the calibration inputs (it can, with a mask it did not choose), so the
  update never makes a layer's calibration error worse; ``guard: false`` is SparseGPT's sweep alone.

SparseGPT already reconstructs its own weights; :class:`crepe.prune_config.PruneConfig` refuses it with
``obs`` unless DSnoT replaced its mask (then SparseGPT is only DSnoT's initial saliency).
"""

from __future__ import annotations

from typing import Any

from crepe.errors import CrepeError
from crepe.registry import Registry
from crepe.sparsegpt import DEFAULTS as SPARSEGPT_DEFAULTS
from crepe.sparsegpt import check_params, obs_update

__all__ = ["NEEDS_HESSIAN", "OBS_DEFAULTS", "UPDATES", "check_obs_params"]

OBS_DEFAULTS: dict[str, Any] = {**SPARSEGPT_DEFAULTS, "guard": True}


def check_obs_params(params: dict[str, Any]) -> None:
    """Validate resolved ``obs`` parameters (blocksize, percdamp, max_damp_retries, guard); raises CrepeError."""
    check_params(params, "update 'obs'")
    if not isinstance(params["guard"], bool):
        raise CrepeError(f"update 'obs' guard={params['guard']!r} must be true or false")


UPDATES = Registry("weight update")
UPDATES.register("none", "the mask only: pruned weights set to zero, the rest unchanged")
UPDATES.register(
    "obs",
    "fixed-mask OBS reconstruction: SparseGPT's column sweep (damped input Hessian, column blocks, damping "
    "retries) with the scorer's mask, never worse per row than the mask alone (guard); needs calibration data",
    defaults=OBS_DEFAULTS, obj=obs_update, check=check_obs_params,
)
NEEDS_HESSIAN: tuple[str, ...] = tuple(n for n, e in UPDATES.items() if e.obj is not None)  # obs
