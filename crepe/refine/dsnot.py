"""DSnoT (Zhang et al. 2024, "Dynamic Sparse No Training", official code 4c029df; spec §9) and our
R²-DSnoT variant (Yi & Richtárik, arXiv 2501.18980; spec §10, a reconstruction).

Training-free prune-and-grow on top of any initial keep-mask; the weights are never updated.
Per input channel j of a linear, from the dense block's calibration inputs:

- ``mu'_j = (1/n_seq) sum_t x_tj`` (seqlen x the mean, the code's ``sum_metric_row``);
- ``var_j``: token-weighted average of the per-sequence population variances.

``D_ij = W_ij * mu'_j`` is the expected output contribution of weight (i, j) and
``e_i = sum_{j pruned} D_ij`` the expected reconstruction error of row i (dense minus sparse).

**Unstructured loop** (vectorised over rows; every row keeps its own pruned count, so masks with
unequal per-row counts, e.g. RIA's per-layer masks, are fine):

- growth list: ``g_ij = D_ij / var_j^p`` (p = ``pow_of_var_regrowing`` = 1) for pruned entries, 0
  for kept ones, sorted ascending per row; a front pointer (most negative) and a back pointer;
- prune list: the kept entries ordered by the initial method's score ascending (``order="initial"``;
  the official code hard-wires the Wanda score, ``order="wanda"``), then regrouped: ``D < 0`` first
  in that order, ``D = 0`` next, ``D > 0`` last in *reversed* order, so the front is the weakest
  negative and the back the weakest positive contributor;
- each cycle (at most ``max_cycle_time`` = 50): grow from the back if ``e_i > 0`` else the front;
  prune from the back if ``e_i < 0`` else the front; both pointers advance whether or not the swap
  is accepted. Accept iff the row is still active and ``|e_i| > update_threshold`` (0.1), plus
  ``sign(e_i + D_prune - D_grow) == sign(e_i^init)`` when ``same_sign`` is on. On accept the grown
  weight is un-masked, the pruned one masked and ``e_i += D_prune - D_grow``. A row that fails once
  stays stopped.

**N:M loop**: the same growth list; the partner pruned for a grown index is the kept weight with
the lowest initial score in the same M-group (each initially kept weight is a partner at most
once), so N:M stays valid. The sign check is always on in the official N:M branch.

Defaults, as the official ``main.py``: max_cycle_time 50, update_threshold 0.1,
pow_of_var_regrowing 1, same sign check off for unstructured (``--without_same_sign`` is a
``type=bool`` flag that is always True) and on for N:M (``same_sign=None`` keeps this split).
``pow_of_var_pruning`` is parsed by the official script but never used, so it is not a parameter
here; ``--without_DSnoT`` is ``refine=None``. ``skip_layer`` defaults to the official ``"mlp"``
(the mlp linears keep the plain initial mask); ``skip_layer="no_skip"`` refines every linear.

**Edge rules (ours; they never trigger while the official lists are long enough, e.g. at LLM
widths):** a row stops when its growth candidate is not currently pruned or would not move ``e``
towards 0 (``g * e <= 0``: the official code would "grow" a kept weight and so raise sparsity), or
when its prune candidate is not currently kept or has ``D`` of ``e``'s sign, or in N:M when its
group has no unused partner left. With these rules and the sign check on, an accepted unstructured
swap never increases ``|e_i|``. The official N:M sign check does *not* guarantee that (a partner
with ``e``'s sign can grow ``|e|`` without flipping it); ``monotone=True`` adds
``|e_after| <= |e|`` to the acceptance test of both loops.

**R²-DSnoT** (spec §10; the paper's formulas were not recoverable, so this is our labelled variant):

1. relative-importance reweighting ``rho_ij = 1/||W_i,:||_1 + 1/||W_:,j||_1`` multiplies the growth
   criterion (``reweight="grow"``, default), or the prune criterion (``"prune"``), never both;
2. the prune list is ordered by ``|W_ij| * ||X_j||^act_pow`` (x rho with ``"prune"``), act_pow 0.5;
3. regularised boundary: with ``gamma1`` or ``gamma2`` non-zero a swap also needs
   ``|e + D_prune - D_grow| + gamma1 |W_prune|^p - gamma2 |W_grow|^p < |e|``; both 0 (default) is
   DSnoT's own acceptance rule.

``reweight="none", act_pow=1, gamma1=gamma2=0`` is exactly DSnoT with ``order="wanda"`` (the
official DSnoT), whatever the initial mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from crepe.errors import CrepeError
from crepe.scoring.ria import safe_inverse
from crepe.types import NMPattern

SKIP_LAYERS = ("no_skip", "mlp", "self_attn")
ORDERS = ("initial", "wanda")
REWEIGHTS = ("grow", "prune", "none")

DSNOT_DEFAULTS: dict[str, Any] = {
    "max_cycle_time": 50,
    "update_threshold": 0.1,
    "pow_of_var_regrowing": 1.0,
    "same_sign": None,  # None: official split (off unstructured, on N:M)
    "monotone": False,
    "skip_layer": "mlp",
    "order": "initial",
}
R2_DEFAULTS: dict[str, Any] = {
    **{k: v for k, v in DSNOT_DEFAULTS.items() if k != "order"},
    "reweight": "grow",
    "act_pow": 0.5,
    "gamma1": 0.0,
    "gamma2": 0.0,
    "p": 1.0,
}


def _number(name: str, value: Any, minimum: float, strict: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or value < minimum or (strict and value == minimum):
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        raise CrepeError(f"{name}={value!r} must be a finite number {bound}")


def check_dsnot_params(refine: str, p: dict[str, Any]) -> None:
    """Validate resolved DSnoT / R²-DSnoT parameters (raises CrepeError with the bad value)."""
    mct = p["max_cycle_time"]
    if isinstance(mct, bool) or not isinstance(mct, int) or mct < 0:
        raise CrepeError(f"max_cycle_time={mct!r} must be an integer >= 0 (official: 50)")
    _number("update_threshold", p["update_threshold"], 0.0)
    _number("pow_of_var_regrowing", p["pow_of_var_regrowing"], 0.0)
    if p["same_sign"] not in (None, True, False):
        raise CrepeError(f"same_sign={p['same_sign']!r} must be true, false or null (official split)")
    if p["monotone"] not in (True, False):
        raise CrepeError(f"monotone={p['monotone']!r} must be true or false")
    if p["skip_layer"] not in SKIP_LAYERS:
        raise CrepeError(f"skip_layer={p['skip_layer']!r} is not one of {', '.join(SKIP_LAYERS)}")
    if refine == "dsnot":
        if p["order"] not in ORDERS:
            raise CrepeError(f"order={p['order']!r} is not one of {', '.join(ORDERS)}")
        return
    if p["reweight"] not in REWEIGHTS:
        raise CrepeError(f"reweight={p['reweight']!r} is not one of {', '.join(REWEIGHTS)}")
    _number("act_pow", p["act_pow"], 0.0)
    _number("gamma1", p["gamma1"], 0.0)
    _number("gamma2", p["gamma2"], 0.0)
    _number("p", p["p"], 0.0, strict=True)


# --- statistics ------------------------------------------------------------------------------------


class MeanVarAccumulator:
    """DSnoT's per-input-channel statistics from hook inputs shaped (batch, seqlen, in).

    ``mean_prime`` = ``(1/n_seq) sum_t x_tj``; ``var`` = token-weighted mean of the per-sequence
    population variances (official ``WrappedGPT.add_batch`` with one sequence per call). Float32
    per batch, float64 running sums.
    """

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.var_tokens = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.n_seq = 0
        self.n_tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float32)
        x = x.reshape(-1, x.shape[-2], x.shape[-1]) if x.dim() >= 3 else x[None]  # (seqs, tokens, in)
        n_seq, n_tok = int(x.shape[0]), int(x.shape[1])
        self.sum += x.sum(dim=(0, 1)).to(torch.float64)
        self.var_tokens += (x.var(dim=1, unbiased=False).to(torch.float64) * n_tok).sum(dim=0)
        self.n_seq += n_seq
        self.n_tokens += n_seq * n_tok

    def mean_prime(self) -> torch.Tensor:
        return (self.sum / max(self.n_seq, 1)).to(torch.float32)

    def var(self) -> torch.Tensor:
        return (self.var_tokens / max(self.n_tokens, 1)).to(torch.float32)


# --- the loops -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Boundary:
    """R²-DSnoT's regularised decision boundary (spec §10, our variant)."""

    gamma1: float
    gamma2: float
    p: float


def _growth_list(
    d: torch.Tensor, keep: torch.Tensor, var: torch.Tensor, power: float, grow_weight: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, ascending stable order of g per row); g = D / var^p on pruned entries, 0 on kept ones."""
    g = torch.where(keep, torch.zeros_like(d), d)
    if power:
        g = g / var.clamp(min=torch.finfo(torch.float32).tiny).pow(power)[None, :]
    if grow_weight is not None:
        g = g * grow_weight
    return g, torch.sort(g, dim=1, stable=True).indices


def _prune_list(d: torch.Tensor, keep: torch.Tensor, prune_score: torch.Tensor) -> torch.Tensor:
    """Kept entries per row: D<0 by score ascending, D=0, then D>0 by score descending; pruned last."""
    cols = d.shape[1]
    asc = torch.sort(torch.where(keep, prune_score, torch.inf), dim=1, stable=True).indices
    d_s, keep_s = d.gather(1, asc), keep.gather(1, asc)
    category = torch.where(d_s < 0, 0, torch.where(d_s == 0, 1, 2))
    category = torch.where(keep_s, category, 3)
    pos = torch.arange(cols, device=d.device).expand_as(asc)
    within = torch.where(category == 2, cols - 1 - pos, pos)  # reversed: stable-ascending, flipped
    return asc.gather(1, torch.argsort(category * cols + within, dim=1))


def _accept(
    active: torch.Tensor,
    valid: torch.Tensor,
    e: torch.Tensor,
    e_after: torch.Tensor,
    sign0: torch.Tensor,
    threshold: float,
    same_sign: bool,
    monotone: bool,
    boundary: Boundary | None,
    w_prune: torch.Tensor,
    w_grow: torch.Tensor,
) -> torch.Tensor:
    ok = active & valid & (e.abs() > threshold)
    if same_sign:
        ok &= torch.sign(e_after) == sign0
    if monotone:
        ok &= e_after.abs() <= e.abs()
    if boundary is not None:
        reg = boundary.gamma1 * w_prune.abs().pow(boundary.p) - boundary.gamma2 * w_grow.abs().pow(boundary.p)
        ok &= e_after.abs() + reg < e.abs()
    return ok


@torch.no_grad()
def dsnot_refine(
    weight: torch.Tensor,
    keep: torch.Tensor,
    prune_score: torch.Tensor,
    mean_prime: torch.Tensor,
    var: torch.Tensor,
    pattern: NMPattern | None = None,
    *,
    max_cycle_time: int = 50,
    update_threshold: float = 0.1,
    pow_of_var_regrowing: float = 1.0,
    same_sign: bool | None = None,
    monotone: bool = False,
    grow_weight: torch.Tensor | None = None,
    boundary: Boundary | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Refine ``keep`` (bool, out x in) of ``weight``; returns (new keep-mask, info).

    ``prune_score`` (higher = keep) orders the prune list (unstructured) or picks the partner inside
    each M-group (N:M). ``grow_weight`` multiplies the growth criterion (R²-DSnoT's rho).
    Per-row pruned counts (and, for N:M, per-group counts) are unchanged.
    """
    w = weight.detach().to(torch.float32)
    keep = keep.to(device=w.device, dtype=torch.bool).clone()
    if keep.shape != w.shape or prune_score.shape != w.shape:
        raise RuntimeError("internal error: weight, keep-mask and prune score must have one shape")
    mean_prime = mean_prime.to(device=w.device, dtype=torch.float32)
    var = var.to(device=w.device, dtype=torch.float32)
    prune_score = prune_score.to(device=w.device, dtype=torch.float32)
    if grow_weight is not None:
        grow_weight = grow_weight.to(device=w.device, dtype=torch.float32)
    if same_sign is None:
        same_sign = pattern is not None
    rows, cols = w.shape
    d = w * mean_prime[None, :]
    e = torch.where(keep, torch.zeros_like(d), d).sum(dim=1)
    e0 = e.clone()
    sign0 = torch.sign(e)
    g, grow_order = _growth_list(d, keep, var, pow_of_var_regrowing, grow_weight)
    ar = torch.arange(rows, device=w.device)
    gf = torch.zeros(rows, dtype=torch.long, device=w.device)
    gb = torch.full((rows,), cols - 1, dtype=torch.long, device=w.device)
    active = torch.ones(rows, dtype=torch.bool, device=w.device)
    swaps = torch.zeros(rows, dtype=torch.long, device=w.device)
    if pattern is None:
        prune_order = _prune_list(d, keep, prune_score)
        n_keep = keep.sum(dim=1)
        pf = torch.zeros(rows, dtype=torch.long, device=w.device)
        pb = n_keep - 1
    else:
        if cols % pattern.m:
            raise RuntimeError(f"internal error: width {cols} not divisible by M={pattern.m}")
        partner = torch.where(keep, prune_score, torch.inf)
        offsets = torch.arange(pattern.m, device=w.device)[None, :]
    cycles = 0
    for _ in range(max_cycle_time):
        if not bool(active.any()):
            break
        cycles += 1
        grow_back = e > 0
        gi = torch.where(grow_back, gb, gf)
        gb = gb - grow_back.long()
        gf = gf + (~grow_back).long()
        g_in = (gi >= 0) & (gi < cols)
        j_g = grow_order[ar, gi.clamp(0, cols - 1)]
        d_g = d[ar, j_g]
        valid = g_in & ~keep[ar, j_g] & (g[ar, j_g] * e > 0)
        if pattern is None:
            prune_back = e < 0
            pi = torch.where(prune_back, pb, pf)
            pb = pb - prune_back.long()
            pf = pf + (~prune_back).long()
            p_in = (pi >= 0) & (pi < n_keep)
            j_p = prune_order[ar, pi.clamp(0, cols - 1)]
            d_p = d[ar, j_p]
            valid &= p_in & keep[ar, j_p] & (d_p * e <= 0)
        else:
            start = j_g - j_g % pattern.m
            group = start[:, None] + offsets
            scores = partner.gather(1, group)
            k = torch.argmin(scores, dim=1)  # first minimum: ties by position
            j_p = start + k
            valid &= torch.isfinite(scores[ar, k]) & keep[ar, j_p]
            partner[ar, j_p] = torch.inf  # official: marked whether or not the swap is accepted
            d_p = d[ar, j_p]
        e_after = e + d_p - d_g
        ok = _accept(
            active, valid, e, e_after, sign0, update_threshold, same_sign, monotone, boundary, w[ar, j_p], w[ar, j_g]
        )
        active = ok
        if bool(ok.any()):
            r = ar[ok]
            keep[r, j_g[ok]] = True
            keep[r, j_p[ok]] = False
            e = torch.where(ok, e_after, e)
            swaps += ok.long()
    info = {
        "swaps": int(swaps.sum()),
        "rows_changed": int((swaps > 0).sum()),
        "rows": rows,
        "cycles": cycles,
        "same_sign": same_sign,
        "mean_abs_error_before": float(e0.abs().mean()) if rows else 0.0,
        "mean_abs_error_after": float(e.abs().mean()) if rows else 0.0,
    }
    return keep, info


# --- per-layer entry point used by the pruner ------------------------------------------------------


def relative_weight(weight: torch.Tensor) -> torch.Tensor:
    """``rho_ij = 1/||W_i,:||_1 + 1/||W_:,j||_1`` (0 for all-zero rows/columns)."""
    a = weight.detach().to(torch.float32).abs()
    return safe_inverse(a.sum(dim=1))[:, None] + safe_inverse(a.sum(dim=0))[None, :]


def is_skipped(layer_name: str, skip_layer: str) -> bool:
    """Official rule: skip when the first component of the in-block name equals ``skip_layer``."""
    return skip_layer != "no_skip" and layer_name.split(".")[0] == skip_layer


def refine_layer(
    refine: str,
    params: dict[str, Any],
    layer_name: str,
    weight: torch.Tensor,
    keep: torch.Tensor,
    init_score: torch.Tensor,
    act_norm: torch.Tensor,
    mean_prime: torch.Tensor,
    var: torch.Tensor,
    pattern: NMPattern | None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Apply ``"dsnot"`` or ``"r2-dsnot"`` with resolved ``params`` to one linear's keep-mask.

    ``layer_name`` is the linear's name inside its block (``self_attn.q_proj``) for ``skip_layer``;
    ``init_score`` is the initial method's score; ``act_norm`` is ``||X_j||_2``.
    """
    if is_skipped(layer_name, params["skip_layer"]):
        return keep, {"skipped": True, "swaps": 0}
    w = weight.detach().to(torch.float32)
    act = act_norm.to(device=w.device, dtype=torch.float32)
    common = {
        "max_cycle_time": params["max_cycle_time"],
        "update_threshold": params["update_threshold"],
        "pow_of_var_regrowing": params["pow_of_var_regrowing"],
        "same_sign": params["same_sign"],
        "monotone": params["monotone"],
    }
    if refine == "dsnot":
        order = init_score if params["order"] == "initial" else w.abs() * act[None, :]
        return dsnot_refine(w, keep, order, mean_prime, var, pattern, **common)
    if refine != "r2-dsnot":
        raise RuntimeError(f"internal error: refine_layer got {refine!r}")
    rho = relative_weight(w) if params["reweight"] != "none" else None
    order = w.abs() * act.clamp(min=0).pow(params["act_pow"])[None, :]
    if params["reweight"] == "prune":
        order = order * rho
    boundary = (
        Boundary(params["gamma1"], params["gamma2"], params["p"]) if params["gamma1"] or params["gamma2"] else None
    )
    grow_weight = rho if params["reweight"] == "grow" else None
    return dsnot_refine(w, keep, order, mean_prime, var, pattern, **common, grow_weight=grow_weight, boundary=boundary)
