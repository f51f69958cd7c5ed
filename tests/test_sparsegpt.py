"""SparseGPT (spec §5): Hessian accumulation, the OBS loop against a slow float64 reference, the
H ~ I reduction to blockwise magnitude, reconstruction quality, N:M validity, channel-permuted
processing, dead inputs and the recorded Cholesky damping retries."""

from __future__ import annotations

import math

import pytest
import torch

from crepe.errors import CrepeError
from crepe.sparsegpt import (
    HessianAccumulator,
    expected_block_pruned,
    inverse_factor,
    sparsegpt_prune,
    sparsegpt_score,
)
from crepe.types import NMPattern


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def correlated_inputs(tokens: int, width: int, seed: int, rank: int | None = None) -> torch.Tensor:
    """Inputs X (tokens, width) with strongly correlated channels: Z A + small noise."""
    g = _gen(seed)
    rank = rank or max(2, width // 4)
    z = torch.randn(tokens, rank, generator=g)
    a = torch.randn(rank, width, generator=g)
    return z @ a + 0.05 * torch.randn(tokens, width, generator=g)


def hessian_of(x: torch.Tensor, n_seq: int = 1) -> torch.Tensor:
    return (2.0 / n_seq) * (x.T.double() @ x.double()).float()


# --- slow reference --------------------------------------------------------------------------------


def reference_sparsegpt(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    pattern: NMPattern | None,
    blocksize: int,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, list[list[bool]]]:
    """OBS column by column in float64 with *immediate* updates of every later column (no lazy
    batching), H^-1 from an explicit inverse, masks from Python sorts (ties by block position)."""
    w = weight.double().clone()
    h = hessian.double().clone()
    out, cols = w.shape
    for j in range(cols):
        if h[j, j] == 0:
            h[j, j] = 1.0
            w[:, j] = 0.0
    h += percdamp * float(torch.diagonal(h).mean()) * torch.eye(cols, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.linalg.inv(h)).T  # H^-1 = U^T U, U upper
    prune = [[False] * cols for _ in range(out)]
    for b in range(0, cols, blocksize):
        end = min(b + blocksize, cols)
        width = end - b
        if pattern is None:
            sal = [
                (float(w[r, c] ** 2 / u[c, c] ** 2), r * width + (c - b), r, c)
                for r in range(out)
                for c in range(b, end)
            ]
            for _, _, r, c in sorted(sal)[: int(out * width * sparsity)]:
                prune[r][c] = True
        for c in range(b, end):
            if pattern is not None and (c - b) % pattern.m == 0:
                for r in range(out):
                    group = sorted((float(w[r, j] ** 2 / u[j, j] ** 2), j) for j in range(c, c + pattern.m))
                    for _, j in group[: pattern.n]:
                        prune[r][j] = True
            q = torch.tensor([0.0 if prune[r][c] else float(w[r, c]) for r in range(out)], dtype=torch.float64)
            err = (w[:, c] - q) / u[c, c]
            w[:, c:] -= err[:, None] * u[c, c:][None, :]
            w[:, c] = q
    return w, prune


def official_loop(
    weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, pattern: NMPattern | None, blocksize: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """A line-by-line float32 transcription of the official ``fasterprune`` (exact-count mask)."""
    w = weight.float().clone()
    h = hessian.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    cols = w.shape[1]
    damp = 0.01 * torch.mean(torch.diag(h))
    diag = torch.arange(cols)
    h[diag, diag] += damp
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    mask = torch.zeros_like(w, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        if pattern is None:
            tmp = w1**2 / (torch.diag(hinv1).reshape((1, -1))) ** 2
            order = torch.argsort(tmp.flatten(), stable=True)[: int(tmp.numel() * sparsity)]
            mask1 = torch.zeros(tmp.numel(), dtype=torch.bool)
            mask1[order] = True
            mask1 = mask1.reshape(tmp.shape)
        else:
            mask1 = torch.zeros_like(w1) == 1
        for i in range(i2 - i1):
            wc = w1[:, i]
            d = hinv1[i, i]
            if pattern is not None and i % pattern.m == 0:
                tmp = w1[:, i : i + pattern.m] ** 2 / (torch.diag(hinv1)[i : i + pattern.m].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.sort(tmp, dim=1, stable=True).indices[:, : pattern.n], True)
            q = wc.clone()
            q[mask1[:, i]] = 0
            q1[:, i] = q
            e = (wc - q) / d
            w1[:, i:] -= e.unsqueeze(1).matmul(hinv1[i, i:].unsqueeze(0))
            err1[:, i] = e
        w[:, i1:i2] = q1
        mask[:, i1:i2] = mask1
        w[:, i2:] -= err1.matmul(hinv[i1:i2, i2:])
    return w, mask


@pytest.mark.parametrize("pattern", [None, NMPattern(2, 4), NMPattern(4, 8)])
def test_matches_official_column_loop(pattern: NMPattern | None) -> None:
    """The segment-solved loop == the official per-column loop: same masks, weights to rounding."""
    g = _gen(20)
    w = torch.randn(96, 320, generator=g) * 0.05  # blocks of 128, 128, 64
    h = hessian_of(correlated_inputs(1024, 320, seed=21, rank=80), n_seq=8)
    got = sparsegpt_prune(w, h, 0.5, pattern)
    ref_w, ref_mask = official_loop(w, h, 0.5, pattern)
    assert torch.equal(~got.keep, ref_mask)
    torch.testing.assert_close(got.weight, ref_w, rtol=1e-5, atol=1e-6)


# --- Hessian ---------------------------------------------------------------------------------------


def test_hessian_accumulator_equals_official_running_average() -> None:
    """Batches of sequences (B, T, in) give 2/n_seq sum X^T X, the official per-sequence running mean."""
    g = _gen(0)
    seqs = torch.randn(6, 5, 8, generator=g)
    acc = HessianAccumulator(8, torch.device("cpu"))
    for chunk in seqs.split(4):  # batches of 4 and 2 sequences
        acc.add(chunk)
    official = torch.zeros(8, 8)
    n = 0
    for s in seqs:  # lib/sparsegpt.py add_batch with tmp = 1
        official *= n / (n + 1)
        n += 1
        x = math.sqrt(2 / n) * s.T.float()
        official += x @ x.T
    assert acc.n_seq == 6
    torch.testing.assert_close(acc.hessian(), official, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(acc.hessian(), hessian_of(seqs.reshape(-1, 8), 6), rtol=1e-5, atol=1e-5)


# --- the OBS loop ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sparsity", "pattern", "blocksize"),
    [(0.5, None, 16), (0.3, None, 32), (0.7, None, 128), (0.5, NMPattern(2, 4), 16), (0.5, NMPattern(4, 8), 32)],
)
def test_matches_slow_reference(sparsity: float, pattern: NMPattern | None, blocksize: int) -> None:
    """Lazy block updates + vectorised masks == column-by-column float64 OBS (width 40: a partial block)."""
    g = _gen(1)
    w = torch.randn(12, 40, generator=g)
    h = hessian_of(correlated_inputs(200, 40, seed=2, rank=30))
    got = sparsegpt_prune(w, h, sparsity, pattern, blocksize=blocksize)
    ref_w, ref_prune = reference_sparsegpt(w, h, sparsity, pattern, blocksize)
    assert torch.equal(~got.keep, torch.tensor(ref_prune)), "masks differ from the reference"
    torch.testing.assert_close(got.weight.double(), ref_w, rtol=1e-3, atol=1e-4)
    assert bool((got.weight[~got.keep] == 0).all())
    assert got.info["damping_retries"] == [] and got.info["percdamp"] == 0.01


def test_zero_sparsity_leaves_weights_unchanged() -> None:
    g = _gen(3)
    w = torch.randn(16, 48, generator=g)
    h = hessian_of(correlated_inputs(100, 48, seed=4))
    res = sparsegpt_prune(w, h, 0.0, blocksize=16)
    assert torch.equal(res.weight, w)
    assert bool(res.keep.all()) and res.n_pruned == 0 and res.info["obs_loss"] == 0.0


@pytest.mark.parametrize("scale", [1.0, 37.5])
def test_identity_hessian_is_blockwise_magnitude_without_compensation(scale: float) -> None:
    """H = c I: U is diagonal, so saliency ~ W^2 per 128-column block and no weight moves."""
    g = _gen(5)
    w = torch.randn(10, 300, generator=g)  # blocks of 128, 128, 44
    res = sparsegpt_prune(w, scale * torch.eye(300), 0.6)
    expected = torch.ones_like(w, dtype=torch.bool)
    for start in range(0, 300, 128):
        block = w[:, start : start + 128].abs()
        k = int(block.numel() * 0.6)
        flat = torch.argsort(block.reshape(-1), stable=True)[:k]
        sub = torch.ones(block.numel(), dtype=torch.bool)
        sub[flat] = False
        expected[:, start : start + 128] = sub.reshape(block.shape)
    assert torch.equal(res.keep, expected)
    assert torch.equal(res.weight, w * expected)  # kept weights bit-identical: no compensation
    assert res.n_pruned == expected_block_pruned((10, 300), 0.6, 128) == 768 + 768 + 264
    # rows do get unequal counts (adaptive per block, not per row)
    assert len(set((~res.keep).sum(dim=1).tolist())) > 1


def _output_error(x: torch.Tensor, w: torch.Tensor, w_new: torch.Tensor) -> float:
    return float(torch.linalg.norm(x @ (w - w_new).T))


@pytest.mark.parametrize("pattern", [None, NMPattern(2, 4)])
def test_reconstruction_beats_magnitude_on_correlated_inputs(pattern: NMPattern | None) -> None:
    """||X W^T - X W'^T|| is far below magnitude pruning's at the same sparsity (statistical check)."""
    x = correlated_inputs(512, 64, seed=6, rank=8)
    w = torch.randn(32, 64, generator=_gen(7))
    res = sparsegpt_prune(w, hessian_of(x), 0.5, pattern, blocksize=32)
    scores = w.abs()
    if pattern is None:
        k = int(0.5 * w.numel())
        keep = torch.ones(w.numel(), dtype=torch.bool)
        keep[torch.argsort(scores.reshape(-1), stable=True)[:k]] = False
        keep = keep.reshape(w.shape)
    else:
        keep = torch.ones_like(w, dtype=torch.bool)
        idx = torch.argsort(scores.reshape(32, -1, 4), dim=-1, stable=True)[..., :2]
        keep.reshape(32, -1, 4).scatter_(-1, idx, False)
    mag = _output_error(x, w, w * keep)
    sgpt = _output_error(x, w, res.weight)
    assert res.n_pruned == int((~keep).sum())
    assert sgpt < 0.5 * mag, (sgpt, mag)


@pytest.mark.parametrize("pattern", [NMPattern(2, 4), NMPattern(4, 8), NMPattern(1, 4)])
def test_nm_pattern_valid_and_exact(pattern: NMPattern) -> None:
    w = torch.randn(24, 64, generator=_gen(8))
    res = sparsegpt_prune(w, hessian_of(correlated_inputs(128, 64, seed=9)), pattern=pattern, blocksize=32)
    zeros = (res.weight.reshape(24, -1, pattern.m) == 0).sum(-1)
    pruned = (~res.keep).reshape(24, -1, pattern.m).sum(-1)
    assert bool((pruned == pattern.n).all()) and bool((zeros >= pattern.n).all())
    assert res.n_pruned == 24 * (64 // pattern.m) * pattern.n


def test_threshold_rule_is_official_k_plus_one_per_block() -> None:
    w = torch.randn(8, 64, generator=_gen(10))
    h = hessian_of(correlated_inputs(128, 64, seed=11))
    exact = sparsegpt_prune(w, h, 0.5, blocksize=32)
    official = sparsegpt_prune(w, h, 0.5, blocksize=32, rule="threshold")
    assert exact.n_pruned == 2 * 128
    assert official.n_pruned == 2 * 129  # tau = sorted[k] and <= tau: k + 1 per block (no ties)


def test_permuted_processing_equals_pruning_permuted_columns() -> None:
    """perm processes columns in permuted order (N:M groups of permuted channels), result unpermuted."""
    w = torch.randn(12, 32, generator=_gen(12))
    h = hessian_of(correlated_inputs(128, 32, seed=13))
    perm = torch.randperm(32, generator=_gen(14))
    got = sparsegpt_prune(w, h, pattern=NMPattern(2, 4), blocksize=16, perm=perm)
    direct = sparsegpt_prune(w[:, perm], h[perm][:, perm], pattern=NMPattern(2, 4), blocksize=16)
    assert torch.equal(got.weight[:, perm], direct.weight)
    assert torch.equal(got.keep[:, perm], direct.keep)
    assert bool(((~got.keep[:, perm]).reshape(12, -1, 4).sum(-1) == 2).all())
    assert not bool(((~got.keep).reshape(12, -1, 4).sum(-1) == 2).all())  # not N:M in the original order


def test_dead_inputs_are_zeroed_like_official() -> None:
    x = correlated_inputs(64, 16, seed=15)
    x[:, 3] = 0
    x[:, 9] = 0
    w = torch.randn(6, 16, generator=_gen(16))
    res = sparsegpt_prune(w, hessian_of(x), 0.25, blocksize=16)
    assert res.info["dead_inputs"] == 2 and res.info["damping_retries"] == []
    assert bool((res.weight[:, [3, 9]] == 0).all())
    score, factor = sparsegpt_score(w, hessian_of(x))
    assert factor.n_dead == 2 and bool((score[:, [3, 9]] == 0).all())


# --- damping retries -------------------------------------------------------------------------------


def indefinite_hessian(width: int, seed: int, neg: float = 0.03) -> torch.Tensor:
    """A symmetric H whose smallest eigenvalue is ``-neg * mean(diag H)``: percdamp 0.01 cannot make
    it positive definite, 0.1 can."""
    g = _gen(seed)
    q, _ = torch.linalg.qr(torch.randn(width, width, generator=g, dtype=torch.float64))
    eig = torch.rand(width, generator=g, dtype=torch.float64) + 0.5
    h = q @ torch.diag(eig) @ q.T
    lam, mean = float(eig.min()), float(torch.diagonal(h).mean())
    shift = (lam + neg * mean) / (1 + neg)
    return (h - shift * torch.eye(width, dtype=torch.float64)).float()


def test_failed_cholesky_retries_with_more_damping_and_records_it() -> None:
    h = indefinite_hessian(24, seed=17)
    factor = inverse_factor(h, 0.01, 3, layer="model.layers.0.mlp.up_proj")
    assert factor.percdamp == pytest.approx(0.1)
    assert [r["percdamp"] for r in factor.retries] == [0.01]
    assert factor.retries[0]["layer"] == "model.layers.0.mlp.up_proj"
    res = sparsegpt_prune(torch.randn(4, 24, generator=_gen(18)), h, 0.5, blocksize=8, layer="L")
    assert res.info["percdamp"] == pytest.approx(0.1) and len(res.info["damping_retries"]) == 1
    assert res.n_pruned == 3 * int(4 * 8 * 0.5)


def test_hopeless_hessian_raises_naming_layer() -> None:
    h = -torch.eye(8)  # negative definite: no damping of +percdamp * mean(diag) < 0 helps
    with pytest.raises(CrepeError, match="model.layers.1.self_attn.q_proj"):
        inverse_factor(h, 0.01, 2, layer="model.layers.1.self_attn.q_proj")
    with pytest.raises(CrepeError, match="not positive definite"):
        sparsegpt_prune(torch.ones(2, 8), torch.full((8, 8), float("nan")), 0.5, layer="x")
    with pytest.raises(CrepeError, match="max_damp_retries"):
        sparsegpt_prune(torch.ones(2, 8), torch.eye(8), 0.5, max_damp_retries=-1)


def test_bad_arguments() -> None:
    w, h = torch.randn(4, 16), torch.eye(16)
    with pytest.raises(CrepeError, match="blocksize 6 is not a multiple of M=4"):
        sparsegpt_prune(w, h, pattern=NMPattern(2, 4), blocksize=6)
    with pytest.raises(CrepeError, match="percdamp"):
        sparsegpt_prune(w, h, 0.5, percdamp=0)
    with pytest.raises(CrepeError, match="rule"):
        sparsegpt_prune(w, h, 0.5, rule="median")
    with pytest.raises(CrepeError, match="outside"):
        sparsegpt_prune(w, h, 1.0)
