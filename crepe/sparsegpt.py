"""SparseGPT (Frantar & Alistarh 2023, arXiv 2301.00774), as the official code at 147d215 (spec §5).

Per linear, from the calibration inputs X (tokens x in) of the *dense* block:

- Hessian ``H = (2 / n_seq) * sum_seq X_seq^T X_seq`` (float32, in x in);
- dead inputs (``H_jj == 0``): ``H_jj <- 1`` and ``W[:, j] <- 0``;
- damping ``H <- H + lambda I`` with ``lambda = percdamp * mean(diag H)`` (percdamp 0.01);
- ``U = cholesky(cholesky_inverse(cholesky(H)), upper=True)``: the upper Cholesky factor of
  ``H^-1``; ``U_tt^2`` is the OBS denominator of column t, row t of U its update direction;
- columns are processed in blocks of 128. Unstructured: at the start of a block the mask prunes the
  lowest ``W^2 / diag(U)^2`` of the whole (out x 128) block jointly, so rows get unequal counts;
  ``rule="exact"`` prunes exactly ``int(sparsity * out * width)`` per block (ties by position),
  ``rule="threshold"`` the official ``<= sorted[k]`` (k + 1 plus ties). N:M: at every column
  ``t % M == 0`` each row prunes its N lowest ``W^2 / diag(U)^2`` among columns t..t+M-1 of the
  *already updated* block (N zeros per M consecutive inputs). Each column's error
  ``(w - q) / U_tt`` is propagated to the block's later columns, and after the block to all later
  columns (lazy batch update).

:func:`obs_update` runs the same sweep with a prune-mask given instead of chosen (``update: obs``:
fixed-mask OBS reconstruction after any scorer's mask).

Deviation from the official code, on purpose: when a Cholesky factorisation fails, the damping is
retried ``max_damp_retries`` times, each time ``10 x`` larger (0.01 -> 0.1 -> 1 -> 10), and every
retry is returned in ``info["damping_retries"]`` so the pruner records it in the manifest (the
official code crashes; RIA's copy retries once with 0.1, silently). TF32 is switched off while a
layer is pruned (official: ``allow_tf32 = False``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from crepe.errors import CrepeError
from crepe.masks import _prune_lowest_k
from crepe.types import NMPattern, check_sparsity

DEFAULTS: dict[str, Any] = {"blocksize": 128, "percdamp": 0.01, "max_damp_retries": 3}
DAMP_GROWTH = 10.0
GROUP_LABEL = "block128"
DOC = "OBS reconstruction from the input Hessian; adaptive mask per 128-column block (spec §5)."
RULES = ("exact", "threshold")


def check_params(p: dict[str, Any], owner: str = "sparsegpt") -> None:
    """Validate resolved SparseGPT parameters (raises CrepeError); ``owner`` names them in messages."""
    bs = p["blocksize"]
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        raise CrepeError(f"{owner} blocksize={bs!r} must be a positive integer (official: 128)")
    pd = p["percdamp"]
    if isinstance(pd, bool) or not isinstance(pd, (int, float)) or not math.isfinite(pd) or pd <= 0:
        raise CrepeError(f"{owner} percdamp={pd!r} must be a positive number (official: 0.01)")
    r = p["max_damp_retries"]
    if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r <= 10:
        raise CrepeError(f"{owner} max_damp_retries={r!r} must be an integer in 0..10")


def check_pattern_blocksize(pattern: NMPattern | None, blocksize: int) -> None:
    if pattern is not None and blocksize % pattern.m:
        raise CrepeError(
            f"sparsegpt blocksize {blocksize} is not a multiple of M={pattern.m} of pattern {pattern}; "
            "N:M groups must not straddle two column blocks"
        )


# --- Hessian accumulation ------------------------------------------------------------------------


def gram(x: torch.Tensor) -> torch.Tensor:
    """``X^T X`` (in x in, float32) of inputs shaped (..., in)."""
    flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
    return flat.T @ flat


class HessianAccumulator:
    """``H = (2 / n_seq) * sum_seq X_seq^T X_seq`` from hook inputs shaped (batch, seqlen, in).

    Equal to the official running average (one sequence per ``add_batch``) up to float32 rounding.
    ``add`` takes a precomputed ``X^T X`` so linears that share one input (q/k/v, gate/up) pay for
    one matmul.
    """

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n_seq = 0

    def add(self, x: torch.Tensor, xtx: torch.Tensor | None = None) -> None:
        self.xtx += gram(x) if xtx is None else xtx
        self.n_seq += int(x.shape[0]) if x.dim() >= 3 else 1

    def hessian(self) -> torch.Tensor:
        if self.n_seq == 0:
            raise RuntimeError("internal error: Hessian requested before any calibration input was seen")
        return self.xtx * (2.0 / self.n_seq)


# --- inverse Hessian factor with recorded damping retries -----------------------------------------


@dataclass
class InverseFactor:
    """Upper Cholesky factor ``U`` of ``(H + lambda I)^-1`` and how it was obtained."""

    u: torch.Tensor
    percdamp: float
    retries: list[dict[str, Any]] = field(default_factory=list)  # one entry per failed attempt
    n_dead: int = 0


def prepare_hessian(weight: torch.Tensor, hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Copies of W and H with dead inputs handled as official: ``H_jj = 1``, ``W[:, j] = 0``."""
    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(device=w.device, dtype=torch.float32).clone()
    if h.shape != (w.shape[1], w.shape[1]):
        raise RuntimeError(f"internal error: Hessian shape {tuple(h.shape)} does not match weight {tuple(w.shape)}")
    dead = torch.diagonal(h) == 0
    torch.diagonal(h)[dead] = 1.0
    w[:, dead] = 0.0
    return w, h, int(dead.sum())


def inverse_factor(
    h: torch.Tensor, percdamp: float = 0.01, max_damp_retries: int = 3, layer: str = ""
) -> InverseFactor:
    """``U = chol(inv(chol(H + lambda I)), upper)``, ``lambda = percdamp * mean(diag H)``.

    On a failed factorisation (or a non-finite factor) the damping grows ``10 x`` and the attempt
    is recorded; after ``max_damp_retries`` retries a CrepeError names the layer.
    """
    mean_diag = torch.diagonal(h).mean()
    retries: list[dict[str, Any]] = []
    for attempt in range(max_damp_retries + 1):
        pd = percdamp * DAMP_GROWTH**attempt
        damped = h.clone()
        torch.diagonal(damped).add_(pd * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0 and bool(torch.isfinite(lower).all()):
            upper, info2 = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if int(info2) == 0 and bool(torch.isfinite(upper).all()):
                return InverseFactor(upper, pd, retries)
            stage = "cholesky of the inverse"
        else:
            stage = "cholesky of H"
        retries.append({"layer": layer, "percdamp": pd, "failed": stage})
    tried = ", ".join(f"{r['percdamp']:g}" for r in retries)
    raise CrepeError(
        f"the input Hessian of layer {layer or '?'} is not positive definite even with percdamp {tried}; "
        "check the calibration data (NaN or degenerate activations) or raise max_damp_retries"
    )


@contextmanager
def no_tf32() -> Iterator[None]:
    """Official SparseGPT disables TF32 matmuls; restore the caller's setting afterwards."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# --- scores and masks ------------------------------------------------------------------------------


def sparsegpt_score(
    weight: torch.Tensor, hessian: torch.Tensor, percdamp: float = 0.01, max_damp_retries: int = 3, layer: str = ""
) -> tuple[torch.Tensor, InverseFactor]:
    """The static SparseGPT saliency ``W^2 / diag(U)^2`` (dead inputs score 0), higher = keep.

    This is DSnoT's ``--initial_method sparsegpt`` metric: computed once from the unmodified
    weight, no reconstruction.
    """
    w, h, n_dead = prepare_hessian(weight, hessian)
    factor = inverse_factor(h, percdamp, max_damp_retries, layer)
    factor.n_dead = n_dead
    return w.square() / torch.diagonal(factor.u).square()[None, :], factor


def block_prune_count(out_dim: int, width: int, sparsity: float) -> int:
    """Weights the exact rule prunes in one (out x width) column block: ``int(sparsity * out * width)``."""
    return int(out_dim * width * sparsity)


def expected_block_pruned(shape: tuple[int, int], sparsity: float, blocksize: int) -> int:
    """Total exact-rule count over the column blocks of a layer (the last block may be narrower)."""
    out_dim, in_dim = shape
    return sum(
        block_prune_count(out_dim, min(blocksize, in_dim - start), sparsity) for start in range(0, in_dim, blocksize)
    )


def _block_mask(saliency: torch.Tensor, sparsity: float, rule: str) -> torch.Tensor:
    """Prune-mask (True = prune) of one column block, all rows jointly."""
    if sparsity == 0:
        return torch.zeros_like(saliency, dtype=torch.bool)
    flat = saliency.reshape(1, -1)
    k = block_prune_count(saliency.shape[0], saliency.shape[1], sparsity)
    if rule == "threshold":  # official: tau = sorted[k], prune <= tau
        tau = flat.kthvalue(min(k + 1, flat.shape[1]), dim=1).values
        return saliency <= tau
    return _prune_lowest_k(flat, k).reshape(saliency.shape)


# --- the OBS loop ----------------------------------------------------------------------------------


@dataclass
class SparseGPTResult:
    weight: torch.Tensor  # float32, same shape and column order as the input weight
    keep: torch.Tensor  # bool keep-mask chosen by the method (dead columns excluded)
    info: dict[str, Any]

    @property
    def n_pruned(self) -> int:
        return int((~self.keep).sum())


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float = 0.0,
    pattern: NMPattern | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    rule: str = "exact",
    max_damp_retries: int = 3,
    perm: torch.Tensor | None = None,
    layer: str = "",
) -> SparseGPTResult:
    """Prune and reconstruct one linear's weight (out, in) from its input Hessian (in, in).

    ``pattern`` (N zeros per M consecutive inputs) overrides ``sparsity``. ``perm`` (new position
    -> original input channel) processes the columns in that order, so the N:M groups are groups of
    the *permuted* channels (channel permutation, spec §6); the result is returned in the original
    order. Returns the new float32 weight, the keep-mask and an info dict (damping used, retries,
    dead inputs, the OBS loss ``sum (w - q)^2 / U_tt^2 / 2``).
    """
    if rule not in RULES:
        raise CrepeError(f"unknown selection rule {rule!r}; allowed: {', '.join(RULES)}")
    if pattern is None:
        sparsity = check_sparsity(sparsity)
    check_params({"blocksize": blocksize, "percdamp": percdamp, "max_damp_retries": max_damp_retries})
    check_pattern_blocksize(pattern, blocksize)
    if pattern is not None and weight.shape[1] % pattern.m:
        raise CrepeError(f"input width {weight.shape[1]} is not divisible by M={pattern.m} of pattern {pattern}")
    return _sweep(weight, hessian, sparsity, pattern, blocksize, percdamp, rule, max_damp_retries, perm, layer)


@torch.no_grad()
def obs_update(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    prune_mask: torch.Tensor,
    blocksize: int = 128,
    percdamp: float = 0.01,
    max_damp_retries: int = 3,
    layer: str = "",
    perm: torch.Tensor | None = None,
    guard: bool = True,
) -> SparseGPTResult:
    """Reconstruct one linear's kept weights with the prune-mask given (True = prune), not chosen.

    SparseGPT's sweep with its selection switched off: the same damped Hessian, inverse factor and
    damping retries, column blocks of ``blocksize``; each pruned weight's OBS error is propagated
    to the later columns. The returned keep-mask is exactly ``~prune_mask`` and every pruned entry
    is exactly 0; dead inputs' weights are zeroed as in :func:`prepare_hessian`. ``perm`` (new
    position -> original input) sets the column processing order, as in :func:`sparsegpt_prune`.
    With SparseGPT's own mask and ``guard=False`` the result equals :func:`sparsegpt_prune`'s
    weights up to float rounding.

    The sweep is greedy: with a mask it did not choose, a pruned weight's compensation can grow a
    later pruned weight, and a row's output error ``d H d^T`` (``d`` its weight change, ``H`` the
    undamped Hessian) can exceed plain masking's. ``guard=True`` keeps, per output row, the plain
    masked weights where they are better, so the output error never grows; ``info["guarded_rows"]``
    counts those rows (``info["obs_loss"]`` stays the sweep's own).
    """
    check_params({"blocksize": blocksize, "percdamp": percdamp, "max_damp_retries": max_damp_retries}, "update obs")
    if prune_mask.shape != weight.shape or prune_mask.dtype != torch.bool:
        raise RuntimeError(f"internal error: prune mask {tuple(prune_mask.shape)} {prune_mask.dtype} does not "
                           f"match weight {tuple(weight.shape)} (bool expected)")
    res = _sweep(weight, hessian, 0.0, None, blocksize, percdamp, "exact", max_damp_retries, perm, layer, prune_mask)
    if guard:
        with no_tf32():
            h = hessian.detach().to(device=res.weight.device, dtype=torch.float32)  # undamped
            w0 = weight.detach().to(res.weight).masked_fill(torch.diagonal(h)[None, :] == 0, 0.0)  # dead as above
            masked = w0.masked_fill(prune_mask.to(w0.device), 0.0)
            d_obs, d_mask = res.weight - w0, masked - w0  # per row d H d^T: twice the output error
            worse = ((d_obs @ h) * d_obs).sum(dim=1) > ((d_mask @ h) * d_mask).sum(dim=1)
        res.weight[worse] = masked[worse]
        res.info["guarded_rows"] = int(worse.sum())
    return res


def _sweep(
    weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, pattern: NMPattern | None, blocksize: int,
    percdamp: float, rule: str, max_damp_retries: int, perm: torch.Tensor | None, layer: str,
    fixed: torch.Tensor | None = None,
) -> SparseGPTResult:
    """Prepare W and H, factor the damped inverse, run :func:`_obs_loop` (in ``perm`` order) and
    return the weight, keep-mask and info in the original column order."""
    with no_tf32():
        w, h, n_dead = prepare_hessian(weight, hessian)
        if fixed is not None:
            fixed = fixed.to(w.device)
        if perm is not None:
            perm = perm.to(w.device)
            w, h = w[:, perm], h[perm][:, perm]
            fixed = fixed[:, perm] if fixed is not None else None
        factor = inverse_factor(h, percdamp, max_damp_retries, layer)
        prune, loss = _obs_loop(w, factor.u, sparsity, pattern, blocksize, rule, fixed)
    if perm is not None:
        inverse = torch.argsort(perm)
        w, prune = w[:, inverse], prune[:, inverse]
    info = {
        "percdamp": factor.percdamp,
        "damping_retries": factor.retries,
        "dead_inputs": n_dead,
        "obs_loss": float(loss),
    }
    return SparseGPTResult(w, ~prune, info)


SEGMENT = 16  # columns solved at once inside a block when the mask is fixed (unstructured)


def _segment_errors(cur: torch.Tensor, prune: torch.Tensor, u_seg: torch.Tensor) -> torch.Tensor:
    """OBS errors of one column segment with a fixed prune-mask, all rows at once.

    The official loop computes, column by column, ``e_i = p_i (w_i - sum_{k<i} e_k U_ki) / U_ii``.
    Row r's errors therefore solve ``e_r A_r = (w_r * p_r)`` with the upper-triangular
    ``A_r = U * (p_r p_r^T) + diag(1 - p_r)`` (kept columns get ``e_i = 0``): one batched solve.
    """
    p = prune.to(u_seg.dtype)
    a = u_seg[None, :, :] * (p[:, :, None] * p[:, None, :])
    a = a + torch.diag_embed(1.0 - p)
    rhs = (cur * p)[:, None, :]
    return torch.linalg.solve_triangular(a, rhs, upper=True, left=False)[:, 0, :]


def _obs_loop(
    w: torch.Tensor, u: torch.Tensor, sparsity: float, pattern: NMPattern | None, blocksize: int, rule: str,
    fixed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The official ``fasterprune`` loop, in place on ``w``; returns (prune-mask, OBS loss).

    ``fixed`` (True = prune, same shape as ``w``) replaces the selection: every block takes its
    columns of ``fixed`` as its mask and is solved in segments of 16 (``sparsity``, ``pattern`` and
    ``rule`` are then unused).

    Mathematically the official column-by-column loop (tests compare it with a slow float64
    reference): within a block, columns are processed in segments whose mask is known at the
    segment start (N:M: one group of M, chosen from the already updated weights as the official
    code does at ``t % M == 0``; unstructured: the block's mask is fixed, segments of 16). Each
    segment's errors come from one batched triangular solve, its kept weights are the running
    weights minus the segment's earlier errors, and the block's later columns are updated once per
    segment instead of once per column.
    """
    out_dim, n_cols = w.shape
    prune = torch.zeros_like(w, dtype=torch.bool)
    loss = torch.zeros((), dtype=torch.float64, device=w.device)
    select_nm = fixed is None and pattern is not None
    seg = pattern.m if select_nm and pattern is not None else SEGMENT
    for i1 in range(0, n_cols, blocksize):
        i2 = min(i1 + blocksize, n_cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        d = torch.diagonal(u1)
        width = i2 - i1
        if fixed is not None:
            mask1 = fixed[:, i1:i2].clone()
        elif pattern is None:
            mask1 = _block_mask(w1.square() / d.square()[None, :], sparsity, rule)
        else:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        for a in range(0, width, seg):
            b = min(a + seg, width)
            cur = w1[:, a:b]
            if select_nm and pattern is not None:  # the N lowest W^2 / U_tt^2 of the group, ties by position
                sal = cur.square() / d[a:b].square()[None, :]
                lowest = torch.sort(sal, dim=1, stable=True).indices[:, : pattern.n]
                mask1[:, a:b].scatter_(1, lowest, True)
            p = mask1[:, a:b]
            u_seg = u1[a:b, a:b]
            e = _segment_errors(cur, p, u_seg)
            kept = cur - e @ torch.triu(u_seg, diagonal=1)
            w1[:, a:b] = kept.masked_fill(p, 0.0)
            err1[:, a:b] = e
            loss += e.double().square().sum() / 2
            if b < width:
                w1[:, b:] -= e @ u1[a:b, b:]
        w[:, i1:i2] = w1
        prune[:, i1:i2] = mask1
        if i2 < n_cols:
            w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return prune, loss
