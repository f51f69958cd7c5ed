"""Input-channel permutation for N:M masks: RIA's channel reallocation (CP) and its LSA refinement.

An N:M mask prunes the N lowest scores of every M *consecutive* input channels of a row. Which
channels share a group is arbitrary, so RIA (spec §6.1, §6.2) first permutes the input channels to
put channels of different importance into the same groups, selects the N:M mask on the permuted
scores, and maps the mask back.

Semantics, as in the official RIA code (spec §6.1 step 5, §18.17):

- a permutation ``perm`` lists, for every new position ``k``, the original channel ``perm[k]``
  (``scores[:, perm]`` is the permuted matrix);
- the returned keep-mask is in the ORIGINAL channel order (``keep[:, perm] = keep_perm``); the
  weights are never permuted, so the pruned model stays a drop-in replacement with the same
  shapes and the same dense forward; perplexity is directly comparable with unpermuted pruning;
- the mask is therefore *generally not N:M in the original order*: it is N:M in the permuted order
  (``keep[:, perm]`` has exactly N zeros in every group of M). Check it with
  :func:`nm_valid_permuted`, never with the plain ``nm_groups_valid`` on the original weight;
- a real 2:4 sparse kernel needs the permuted layout: permute the weight's input columns
  (``W[:, perm]``) and the rows of whatever produces this layer's input (the previous linear's
  output rows, or gather the activations) in the same way. That is why the permutation is returned
  and should be recorded with the mask; it is not applied to the model here.

Both methods maximise the *retained score*, the sum of the kept scores ``Σ S[keep]``:

- ``cp`` (§6.1): channel importance ``v_j = Σ_i S_ij`` (or the two "retained degree" variants),
  ascending sort, cut into M quantile chunks of ``G = in/M`` channels, and snake them into the
  groups (group g takes the g-th channel of every even chunk and the (G-1-g)-th of every odd one);
- ``lsa`` (§6.2): CP, then one pass per slot position c = 0..M-1: every group keeps its other M-1
  channels and gets the slot-c channel of some group, chosen by one linear sum assignment
  (``scipy.optimize.linear_sum_assignment``, maximise) over the value matrix
  ``V[r, g]`` = retained score of group r when it takes group g's slot-c channel. The identity is
  feasible, so no pass lowers the retained score. ``blocks`` (official ``--fast``) splits the
  groups into independent slices to cut the O(G^3) cost.

Deviation from the official code (documented, on by default, ``fallback=False`` turns it off):
the official CP/LSA permutation is always used, even in the rare case where it retains *less*
than the unpermuted N:M mask (CP is a heuristic; LSA only improves on CP). With ``fallback=True``
the identity permutation is kept in that case, so the retained score is never below plain N:M.

Everything is deterministic: stable sorts, float64 sums, and scipy's deterministic solver.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from crepe.errors import CrepeError
from crepe.masks import select_mask
from crepe.types import NMPattern, check_sparsity

PERMUTE_METHODS: tuple[str, ...] = ("cp", "lsa")
IMPORTANCE_SCORES: tuple[str, ...] = ("sum", "retained_degree_unstructured", "retained_degree_per_outneuron")
PERMUTE_DEFAULTS: dict[str, dict[str, Any]] = {
    "cp": {"importance": "sum", "fallback": True},
    "lsa": {"importance": "sum", "fallback": True, "blocks": 1},
}
# Chunks of the (rows, G_b, G_b) broadcast when building an LSA value matrix: at most this many
# elements and rows; each chunk is summed in float32 (<= 32 terms) and accumulated in float64.
_LSA_CHUNK_ELEMS = 1 << 21
_LSA_CHUNK_ROWS = 32


# --- helpers -------------------------------------------------------------------------------------


def _check_inputs(scores: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    if not isinstance(pattern, NMPattern):
        raise CrepeError(f"channel permutation needs an N:M pattern (e.g. 2:4), got {pattern!r}")
    if scores.dim() != 2:
        raise CrepeError(f"scores must be a 2-D (out, in) matrix, got shape {tuple(scores.shape)}")
    if scores.shape[1] % pattern.m:
        raise CrepeError(
            f"input width {scores.shape[1]} is not divisible by M={pattern.m} of pattern {pattern}; "
            "use a pattern whose M divides the layer's input width"
        )
    s = scores.detach().to(torch.float32)
    if not torch.isfinite(s).all():
        raise CrepeError("scores contain NaN or infinite values; check the weights and activations")
    return s


def check_permutation(perm: torch.Tensor | list[int], width: int) -> torch.Tensor:
    """``perm`` as an int64 tensor if it is a permutation of ``range(width)``, else raise."""
    p = torch.as_tensor(perm, dtype=torch.int64).cpu()
    if p.shape != (width,) or not torch.equal(torch.sort(p).values, torch.arange(width)):
        raise CrepeError(f"not a permutation of the {width} input channels: {p.tolist()[:8]}...")
    return p


def retained_score(scores: torch.Tensor, keep: torch.Tensor) -> float:
    """``Σ scores[keep]`` in float64: the quantity CP and LSA maximise."""
    return float(torch.where(keep, scores, torch.zeros_like(scores)).sum(dtype=torch.float64))


def nm_retained(scores: torch.Tensor, pattern: NMPattern, perm: torch.Tensor | None = None) -> float:
    """Retained score of the plain N:M mask of ``scores[:, perm]`` (identity when ``perm`` is None)."""
    s = scores if perm is None else scores[:, perm.to(scores.device)]
    return retained_score(s, select_mask(s, pattern=pattern))


def unpermute_mask(keep_permuted: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Map a mask of ``scores[:, perm]`` back to the original channel order: ``keep[:, perm] = kp``."""
    keep = torch.empty_like(keep_permuted)
    keep[:, perm.to(keep_permuted.device)] = keep_permuted
    return keep


def nm_valid_permuted(weight_or_keep: torch.Tensor, pattern: NMPattern, perm: torch.Tensor | list[int]) -> bool:
    """True when ``x[:, perm]`` is valid N:M, for a pruned weight (zeros) or a keep-mask (False = pruned).

    This is the validity check for permuted masks: the original-order weight usually fails the plain
    :func:`crepe.masks.nm_groups_valid`, its permuted view must pass.
    """
    x = weight_or_keep
    out_dim, width = x.shape
    if width % pattern.m:
        return False
    view = x[:, check_permutation(perm, width).to(x.device)]
    pruned = ~view if view.dtype == torch.bool else view == 0
    counts = pruned.reshape(out_dim, width // pattern.m, pattern.m).sum(dim=-1)
    return bool((counts >= pattern.n).all())


def lsa_fast_blocks(linear_name: str) -> int:
    """The official ``--fast`` LSA block count for a linear: 4 for attention projections, 8 for
    up/gate, 16 otherwise (down_proj). ``blocks=1`` (the default) is the exact per-layer LSA."""
    if any(k in linear_name for k in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return 4
    if "up_proj" in linear_name or "gate_proj" in linear_name:
        return 8
    return 16


# --- CP (spec §6.1) ------------------------------------------------------------------------------


def _lexsort_two(primary: torch.Tensor, secondary: torch.Tensor) -> torch.Tensor:
    """Indices sorting ascending by ``primary``, ties by ``secondary``, then by index (stable)."""
    idx = torch.sort(secondary, stable=True).indices
    return idx[torch.sort(primary[idx], stable=True).indices]


def channel_order(scores: torch.Tensor, pattern: NMPattern, importance: str = "sum") -> torch.Tensor:
    """Input channels sorted by ascending importance (CP step 2-3), deterministic (stable sort).

    ``sum``: ``v_j = Σ_i S_ij``. The "retained degree" variants (official ``--importance_score``)
    first build an unstructured mask at sparsity N/M (per layer with the official ``<= tau`` rule,
    or per output row) and sort by the column's retained score, ties by its pruned count.
    """
    if importance == "sum":
        return torch.sort(scores.sum(dim=0, dtype=torch.float64), stable=True).indices
    if importance not in IMPORTANCE_SCORES:
        raise CrepeError(
            f"unknown channel importance {importance!r}; allowed: {', '.join(IMPORTANCE_SCORES)}"
        )
    sparsity = check_sparsity(pattern.sparsity)
    if importance == "retained_degree_unstructured":
        keep = select_mask(scores, sparsity, group="layer", rule="threshold")
    else:
        keep = select_mask(scores, sparsity, group="row")
    pruned_count = (~keep).sum(dim=0).to(torch.float64)
    kept_score = torch.where(keep, scores, torch.zeros_like(scores)).sum(dim=0, dtype=torch.float64)
    return _lexsort_two(kept_score, pruned_count)


def cp_permutation(scores: torch.Tensor, pattern: NMPattern, importance: str = "sum") -> torch.Tensor:
    """RIA's heuristic channel reallocation: the snake of M importance quantiles (spec §6.1 step 4).

    With ``sigma`` the ascending channel order and chunks ``chunk_k = sigma[kG:(k+1)G]``:
    ``perm[g*M + k] = chunk_k[g]`` for even k and ``chunk_k[G-1-g]`` for odd k.
    """
    return _cp(_check_inputs(scores, pattern), pattern, importance)


def _cp(s: torch.Tensor, pattern: NMPattern, importance: str) -> torch.Tensor:
    m = pattern.m
    groups = s.shape[1] // m
    sigma = channel_order(s, pattern, importance).cpu()
    chunks = sigma.reshape(m, groups)  # chunk k = row k
    chunks[1::2] = chunks[1::2].flip(1)  # odd chunks run backwards
    return chunks.t().reshape(-1).contiguous()  # position g*M + k <- chunks[k, g]


# --- LSA (spec §6.2) -----------------------------------------------------------------------------


def _keep_count(pattern: NMPattern) -> int:
    return pattern.m - pattern.n


def lsa_value_matrix(permuted: torch.Tensor, pattern: NMPattern, slot: int) -> torch.Tensor:
    """``V[r, g]`` (float64, G x G) for one slice of groups: the retained score of group r when it keeps
    its own channels in the slots other than ``slot`` and takes the ``slot`` channel of group g.

    ``permuted`` is the (out, G*M) score slice in the current order. With K = M - N kept per group
    and a_1 >= a_2 >= ... the group's M-1 other values in one row, the top-K sum of those plus a
    candidate x is ``(a_1 + ... + a_{K-1}) + max(x, a_K)``, so
    ``V[r, g] = Σ_i T[i, r] + Σ_i max(x[i, g], a_K[i, r])``. The row sums are float32 over chunks of
    at most 32 rows accumulated in float64 (about 1e-7 relative); :func:`lsa_refine` re-checks
    every pass with an exact float64 total, so rounding can never lower the retained score.
    """
    out_dim, width = permuted.shape
    m, k = pattern.m, _keep_count(pattern)
    groups = width // m
    tuples = permuted.reshape(out_dim, groups, m)
    others = torch.cat([tuples[:, :, :slot], tuples[:, :, slot + 1 :]], dim=2)  # (out, G, M-1)
    top = torch.topk(others, k, dim=2, sorted=True).values  # (out, G, K), descending
    base = top[:, :, : k - 1].sum(dim=(0, 2), dtype=torch.float64)  # (G,) Σ_i T[i, r]
    kth = top[:, :, k - 1]  # (out, G): a_K[i, r]
    cand = tuples[:, :, slot]  # (out, G): x[i, g]
    value = torch.zeros(groups, groups, dtype=torch.float64, device=permuted.device)
    step = max(1, min(_LSA_CHUNK_ROWS, _LSA_CHUNK_ELEMS // (groups * groups)))
    for start in range(0, out_dim, step):
        a = kth[start : start + step, :, None]  # (c, G_r, 1)
        x = cand[start : start + step, None, :]  # (c, 1, G_g)
        value += torch.maximum(a, x).sum(dim=0)  # float32 over <= 32 rows, then float64
    return value + base[:, None]


def _solve_assignment(value: torch.Tensor) -> torch.Tensor:
    try:
        from scipy.optimize import linear_sum_assignment  # heavy: only LSA needs scipy.optimize
    except ImportError as exc:  # scipy is in the "search" extra
        raise CrepeError("LSA channel permutation needs scipy; install the 'search' extra") from exc
    rows, cols = linear_sum_assignment(value.cpu().numpy(), maximize=True)
    donor = torch.empty(value.shape[0], dtype=torch.int64)
    donor[torch.as_tensor(rows, dtype=torch.int64)] = torch.as_tensor(cols, dtype=torch.int64)
    return donor


def lsa_step(
    scores: torch.Tensor, pattern: NMPattern, perm: torch.Tensor, slot: int, blocks: int = 1
) -> torch.Tensor:
    """One LSA pass over slot position ``slot``: the new permutation (spec §6.2 steps 1-4).

    The groups are split into ``blocks`` contiguous slices; in each, group r's new slot-``slot``
    channel is the old slot-``slot`` channel of its assigned donor group.
    """
    s = _check_inputs(scores, pattern)
    perm = check_permutation(perm, s.shape[1])
    if not 0 <= slot < pattern.m:
        raise CrepeError(f"LSA slot {slot} is outside 0..{pattern.m - 1}")
    return _lsa_step(s, pattern, perm, slot, _check_blocks(blocks, s.shape[1] // pattern.m))


def _lsa_step(s: torch.Tensor, pattern: NMPattern, perm: torch.Tensor, slot: int, blocks: int) -> torch.Tensor:
    m = pattern.m
    per_block = s.shape[1] // m // blocks
    new = perm.clone()
    for b in range(blocks):
        lo, hi = b * per_block * m, (b + 1) * per_block * m
        piece = perm[lo:hi]
        value = lsa_value_matrix(s[:, piece.to(s.device)], pattern, slot)
        donor = _solve_assignment(value)
        rows = torch.arange(per_block)
        new[lo + rows * m + slot] = piece[donor * m + slot]
    return new


def _check_blocks(blocks: Any, groups: int) -> int:
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
        raise CrepeError(f"LSA blocks must be a positive integer, got {blocks!r}")
    if groups % blocks:
        raise CrepeError(
            f"LSA blocks={blocks} does not divide the {groups} groups of this layer; "
            "use a divisor of in_features / M (1 = exact)"
        )
    return blocks


def lsa_refine(
    scores: torch.Tensor, pattern: NMPattern, perm: torch.Tensor, blocks: int = 1
) -> tuple[torch.Tensor, list[float]]:
    """M LSA passes (slot 0, 1, ..., M-1, once each, as the official code) starting from ``perm``.

    Returns the final permutation and the retained score after each pass (never decreasing: a pass
    whose exact float64 total would be lower, possible only through rounding, is discarded).
    """
    s = _check_inputs(scores, pattern)
    current = check_permutation(perm, s.shape[1])
    blocks = _check_blocks(blocks, s.shape[1] // pattern.m)
    keep, total = _keep_and_retained(s, pattern, current)
    current, totals, _ = _lsa_refine(s, pattern, current, blocks, keep, total)
    return current, totals


def _keep_and_retained(s: torch.Tensor, pattern: NMPattern, perm: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The N:M keep-mask of ``s[:, perm]`` (permuted order) and its retained score."""
    permuted = s[:, perm.to(s.device)]
    keep = select_mask(permuted, pattern=pattern)
    return keep, retained_score(permuted, keep)


def _lsa_refine(
    s: torch.Tensor, pattern: NMPattern, perm: torch.Tensor, blocks: int, keep: torch.Tensor, total: float
) -> tuple[torch.Tensor, list[float], torch.Tensor]:
    totals: list[float] = []
    for slot in range(pattern.m):
        candidate = _lsa_step(s, pattern, perm, slot, blocks)
        cand_keep, cand_total = _keep_and_retained(s, pattern, candidate)
        if cand_total >= total:
            perm, keep, total = candidate, cand_keep, cand_total
        totals.append(total)
    return perm, totals, keep


# --- public entry point --------------------------------------------------------------------------


def _resolve_opts(method: str, opts: dict[str, Any]) -> dict[str, Any]:
    if method not in PERMUTE_METHODS:
        raise CrepeError(f"unknown channel permutation {method!r}; allowed: {', '.join(PERMUTE_METHODS)}")
    defaults = PERMUTE_DEFAULTS[method]
    unknown = sorted(set(opts) - set(defaults))
    if unknown:
        raise CrepeError(
            f"channel permutation {method!r} has no option {unknown[0]!r}; its options: {', '.join(defaults)}"
        )
    full = {**defaults, **opts}
    if not isinstance(full["fallback"], bool):
        raise CrepeError(f"fallback must be true or false, got {full['fallback']!r}")
    return full


def permuted_mask(
    scores: torch.Tensor, pattern: NMPattern, method: str = "cp", **opts: Any
) -> tuple[torch.Tensor, dict[str, Any]]:
    """N:M keep-mask of ``scores`` (out, in) selected over permuted input channels, in original order.

    ``method``: ``"cp"`` (RIA channel reallocation, spec §6.1) or ``"lsa"`` (CP, then the
    linear-sum-assignment refinement, spec §6.2). Options: ``importance`` ("sum"), ``fallback``
    (True: keep the identity if the permutation would retain less), and for lsa ``blocks`` (1).

    Returns ``(keep, info)``: ``keep`` is a bool (out, in) mask in the original channel order with
    ``keep[:, perm]`` valid N:M (exactly N pruned per group of M); ``info`` holds ``method``,
    ``pattern``, ``retained_before`` (plain N:M, identity order), ``retained_cp``,
    ``retained_after`` (the returned mask), ``gain`` (after - before), ``relative_gain``
    (gain / before, 0 if before is 0), ``lsa_passes`` (retained score after each LSA pass),
    ``fallback_used``, the options, and ``permutation`` (list of ints: new position -> original
    channel). Same inputs, same outputs, bit for bit.
    """
    s = _check_inputs(scores, pattern)
    full = _resolve_opts(method, opts)
    if method == "lsa":
        _check_blocks(full["blocks"], s.shape[1] // pattern.m)
    keep_identity = select_mask(s, pattern=pattern)
    before = retained_score(s, keep_identity)
    perm = _cp(s, pattern, full["importance"])
    keep_perm, retained_cp = _keep_and_retained(s, pattern, perm)
    after, passes = retained_cp, []
    if method == "lsa":
        perm, passes, keep_perm = _lsa_refine(s, pattern, perm, full["blocks"], keep_perm, retained_cp)
        after = passes[-1]
    fallback_used = bool(full["fallback"] and after < before)
    if fallback_used:
        perm, after, keep = torch.arange(s.shape[1]), before, keep_identity
    else:
        keep = unpermute_mask(keep_perm, perm)
    if keep.device != scores.device:
        keep = keep.to(scores.device)
    gain = after - before
    info: dict[str, Any] = {
        "method": method,
        "pattern": str(pattern),
        **full,
        "retained_before": before,
        "retained_cp": retained_cp,
        "retained_after": after,
        "gain": gain,
        "relative_gain": gain / before if before and math.isfinite(before) else 0.0,
        "lsa_passes": passes,
        "fallback_used": fallback_used,
        "permutation": perm.tolist(),
    }
    return keep, info
