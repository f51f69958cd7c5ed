"""The heavy-tail metric of AlphaPruning (spec §12): the empirical spectral density (ESD) of a weight's
``W^T W`` and its power-law exponent alpha, per weight and per decoder block.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from crepe.blocks import find_blocks
from crepe.errors import CrepeError
from crepe.weights import prunable_weights

ESD_BINS = 100
ESD_METRICS: tuple[str, ...] = ("alpha_peak", "alpha_mid")


def esd_eigenvalues(weight: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of ``W^T W`` = squared singular values (float32 SVD as official), ascending, float64.

    Exact zeros (rank-deficient weights) are dropped: the official code would take log(0).
    """
    eigs = torch.linalg.svdvals(weight.detach().to(torch.float32)).square().to(torch.float64).cpu()
    eigs = torch.sort(eigs).values
    return eigs[eigs > 0]


def _powerlaw_alpha(log_eigs: torch.Tensor, i: int) -> float:
    n = log_eigs.numel() - i
    return float(1.0 + n / (log_eigs[i:].sum() - n * log_eigs[i]))


def esd_alpha(weight: torch.Tensor, metric: str = "alpha_peak", bins: int = ESD_BINS) -> float:
    """Heavy-tail exponent of the ESD of ``weight`` (spec §12.1-4, AlphaPruning's ``net_esd_estimator``).

    See :func:`esd_alpha_from_eigenvalues` for the estimator.
    """
    if metric not in ESD_METRICS:
        raise CrepeError(f"unknown ESD metric {metric!r}; allowed: {', '.join(ESD_METRICS)}")
    eigs = esd_eigenvalues(weight)
    if eigs.numel() < 2:
        raise CrepeError(f"a weight of shape {tuple(weight.shape)} has fewer than 2 non-zero singular values")
    return esd_alpha_from_eigenvalues(eigs, metric, bins)


def esd_alpha_from_eigenvalues(eigs: torch.Tensor, metric: str = "alpha_peak", bins: int = ESD_BINS) -> float:
    """Power-law exponent of ascending positive eigenvalues ``eigs`` (float64, at least 2).

    Power-law MLE for a cut at ``xmin = lambda_k``: ``alpha_k = 1 + n / (Σ_{m>=k} ln lambda_m - n ln
    lambda_k)``, ``n = N - k``. ``alpha_mid``: k = N // 2. ``alpha_peak``: the candidates are the
    eigenvalues up to 1.5x the left edge of the fullest of ``bins`` log10-histogram bins, and the
    one with the smallest KS distance ``max |1 - (lambda/xmin)^(1-alpha) - (m-k)/n|`` wins (only
    alpha > 1 is scored). The official lower bound compares linear eigenvalues with
    ``log10(0.95 x_peak)``; that quirk is reproduced for parity.
    """
    if metric not in ESD_METRICS:
        raise CrepeError(f"unknown ESD metric {metric!r}; allowed: {', '.join(ESD_METRICS)}")
    eigs = eigs.to(torch.float64)
    n_eigs = eigs.numel()
    log_eigs = eigs.log()
    if metric == "alpha_mid":
        return _powerlaw_alpha(log_eigs, n_eigs // 2)
    hist = torch.log10(eigs)
    lo, hi = float(hist.min()), float(hist.max())
    counts = torch.histc(hist, bins, min=lo, max=hi)
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    x_peak = 10 ** float(edges[int(torch.argmax(counts))])
    xmin_min = math.log10(0.95 * x_peak)  # official quirk: a log-scale bound on linear eigenvalues
    xmin_max = 1.5 * x_peak
    alphas = torch.zeros(n_eigs - 1, dtype=torch.float64)
    dists = torch.ones(n_eigs - 1, dtype=torch.float64)
    for i in range(n_eigs - 1):
        xmin = float(eigs[i])
        if xmin < xmin_min:
            continue
        if xmin > xmin_max:
            break
        alpha = _powerlaw_alpha(log_eigs, i)
        alphas[i] = alpha
        if alpha > 1:
            n = n_eigs - i
            seq = torch.arange(n, dtype=torch.float64)
            dists[i] = torch.max(torch.abs(1 - (eigs[i:] / xmin) ** (1 - alpha) - seq / n))
    return float(alphas[int(torch.argmin(dists))])


def block_param_counts(model: nn.Module, blocks_path: str | None = None) -> list[int]:
    """Prunable parameters (the block's weight matrices crepe prunes) per decoder block."""
    _, blocks = find_blocks(model, blocks_path)
    return [sum(w.numel for w in prunable_weights(b).values()) for b in blocks]


@torch.no_grad()
def block_esd_metrics(
    model: nn.Module, metric: str = "alpha_peak", blocks_path: str | None = None, device: Any = None
) -> list[float]:
    """AlphaPruning ``block_wise`` metric: the mean ESD alpha over each block's linears (dense weights)."""
    _, blocks = find_blocks(model, blocks_path)
    out = []
    for block in blocks:
        linears = prunable_weights(block)
        if not linears:
            raise CrepeError("a decoder block contains no weight matrices to measure")
        values = [
            esd_alpha(w.matrix().to(device) if device is not None else w.matrix(), metric)
            for w in linears.values()
        ]
        out.append(float(np.mean(values)))
    return out


