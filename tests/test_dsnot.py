"""DSnoT and R²-DSnoT (spec §9, §10): a pure-Python reference loop on hypothesis cases, golden
cases, count / N:M invariants from masks with unequal per-row counts, the sign-check property,
R²-DSnoT's reduction to DSnoT, the statistics, and parameter validation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crepe.errors import CrepeError
from crepe.masks import select_mask
from crepe.refine import resolve_refine_params
from crepe.refine.dsnot import MeanVarAccumulator, dsnot_refine, refine_layer, relative_weight
from crepe.types import NMPattern

FAST = settings(deadline=None, max_examples=60)
T, F = True, False


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def reference_dsnot(
    weight: list[list[float]],
    keep: list[list[bool]],
    score: list[list[float]],
    mean: list[float],
    var: list[float],
    pattern: NMPattern | None,
    max_cycle_time: int = 50,
    threshold: float = 0.1,
    power: float = 1.0,
    same_sign: bool | None = None,
    monotone: bool = False,
) -> tuple[list[list[bool]], list[list[float]]]:
    """Row by row, list by list, as spec §9 plus our edge rules; returns (mask, |e| per accepted swap)."""
    same_sign = pattern is not None if same_sign is None else same_sign
    out_mask, traces = [], []
    for w, kp0, sc in zip(weight, keep, score):
        cols = len(w)
        kp = list(kp0)
        d = [w[j] * mean[j] for j in range(cols)]
        e = sum(d[j] for j in range(cols) if not kp[j])
        sign0 = _sign(e)
        g = [0.0 if kp[j] else (d[j] / var[j] ** power if power else d[j]) for j in range(cols)]
        grow = sorted(range(cols), key=lambda j: (g[j], j))
        kept = sorted((j for j in range(cols) if kp[j]), key=lambda j: (sc[j], j))
        plist = [j for j in kept if d[j] < 0] + [j for j in kept if d[j] == 0] + [j for j in kept if d[j] > 0][::-1]
        used: set[int] = set()
        gf, gb, pf, pb = 0, cols - 1, 0, len(plist) - 1
        trace = [abs(e)]
        for _ in range(max_cycle_time):
            if e > 0:
                gpos, gb = gb, gb - 1
            else:
                gpos, gf = gf, gf + 1
            jg = grow[gpos] if 0 <= gpos < cols else None
            valid = jg is not None and not kp[jg] and g[jg] * e > 0
            jp = None
            if pattern is None:
                if e < 0:
                    ppos, pb = pb, pb - 1
                else:
                    ppos, pf = pf, pf + 1
                if 0 <= ppos < len(plist):
                    jp = plist[ppos]
                valid = valid and jp is not None and kp[jp] and d[jp] * e <= 0
            elif jg is not None:
                start = jg - jg % pattern.m
                cands = [j for j in range(start, start + pattern.m) if kp0[j] and j not in used]
                if cands:
                    jp = min(cands, key=lambda j: (sc[j], j))
                    used.add(jp)
                valid = valid and jp is not None
            if not valid:
                break
            e_after = e + d[jp] - d[jg]
            ok = abs(e) > threshold
            ok = ok and (not same_sign or _sign(e_after) == sign0)
            ok = ok and (not monotone or abs(e_after) <= abs(e))
            if not ok:
                break
            kp[jg], kp[jp], e = True, False, e_after
            trace.append(abs(e))
        out_mask.append(kp)
        traces.append(trace)
    return out_mask, traces


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# --- hypothesis: vectorised == reference -------------------------------------------------------------

# Integer weights and means, variances in {1, 2, 4}: every float32 operation of both sides is exact.
ints = st.integers(-6, 6).map(float)


@st.composite
def cases(draw: st.DrawFn, nm: bool) -> dict:
    m = 4
    rows = draw(st.integers(1, 4))
    cols = m * draw(st.integers(1, 4)) if nm else draw(st.integers(2, 12))
    w = [[draw(ints) for _ in range(cols)] for _ in range(rows)]
    mean = [draw(ints) for _ in range(cols)]
    var = [draw(st.sampled_from([1.0, 2.0, 4.0])) for _ in range(cols)]
    score = [[draw(st.integers(0, 5)) * 1.0 for _ in range(cols)] for _ in range(rows)]
    if nm:
        keep = select_mask(_t(score), pattern=NMPattern(2, m)).tolist()
    else:  # arbitrary masks with unequal per-row counts
        keep = [[draw(st.booleans()) for _ in range(cols)] for _ in range(rows)]
    return {
        "w": w, "keep": keep, "score": score, "mean": mean, "var": var,
        "pattern": NMPattern(2, m) if nm else None,
        "max_cycle_time": draw(st.integers(0, 8)),
        "threshold": draw(st.sampled_from([0.0, 0.5, 3.0])),
        "same_sign": draw(st.sampled_from([None, True, False])),
        "monotone": draw(st.booleans()),
    }


def _run(case: dict) -> tuple[torch.Tensor, dict]:
    return dsnot_refine(
        _t(case["w"]), torch.tensor(case["keep"]), _t(case["score"]), _t(case["mean"]), _t(case["var"]),
        case["pattern"], max_cycle_time=case["max_cycle_time"], update_threshold=case["threshold"],
        same_sign=case["same_sign"], monotone=case["monotone"],
    )


def _ref(case: dict) -> tuple[list[list[bool]], list[list[float]]]:
    return reference_dsnot(
        case["w"], case["keep"], case["score"], case["mean"], case["var"], case["pattern"],
        case["max_cycle_time"], case["threshold"], 1.0, case["same_sign"], case["monotone"],
    )


@FAST
@given(cases(nm=False))
def test_unstructured_matches_reference(case: dict) -> None:
    keep, info = _run(case)
    ref_keep, traces = _ref(case)
    assert keep.tolist() == ref_keep
    assert info["swaps"] == sum(len(t) - 1 for t in traces)


@FAST
@given(cases(nm=True))
def test_nm_matches_reference(case: dict) -> None:
    keep, _ = _run(case)
    ref_keep, _ = _ref(case)
    assert keep.tolist() == ref_keep


@FAST
@given(cases(nm=False))
def test_unstructured_keeps_every_row_count(case: dict) -> None:
    keep, _ = _run(case)
    assert keep.sum(dim=1).tolist() == [sum(r) for r in case["keep"]]


@FAST
@given(cases(nm=True))
def test_nm_stays_valid(case: dict) -> None:
    keep, _ = _run(case)
    pruned = (~keep).reshape(len(case["w"]), -1, 4).sum(-1)
    assert bool((pruned == 2).all())


@FAST
@given(cases(nm=False))
def test_sign_check_never_increases_error(case: dict) -> None:
    """Unstructured, sign check on: every accepted swap moves e towards 0 and never flips its sign."""
    case = {**case, "same_sign": True, "monotone": False}
    _, traces = _ref(case)
    for trace in traces:
        assert all(b < a for a, b in zip(trace, trace[1:])), trace
    # and the implementation agrees with the reference on this setting
    keep, _ = _run(case)
    assert keep.tolist() == _ref(case)[0]


def _row_error(w: torch.Tensor, keep: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    return torch.where(keep, 0.0, w * mean[None, :]).sum(dim=1)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("pattern", [None, NMPattern(2, 4)])
def test_error_trajectory_monotone_on_random_layers(seed: int, pattern: NMPattern | None) -> None:
    """Running t cycles is a prefix of running t+1: |e_i| after each cycle never grows when the sign
    check (unstructured) or monotone (N:M) is on; random float layers with a RIA-like per-layer mask."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 32, generator=g)
    mean = torch.randn(32, generator=g)
    var = torch.rand(32, generator=g) + 0.1
    score = w.abs() * (torch.rand(32, generator=g) + 0.5)
    keep0 = select_mask(score, 0.5, group="layer") if pattern is None else select_mask(score, pattern=pattern)
    kwargs = {"same_sign": True} if pattern is None else {"monotone": True}
    prev = _row_error(w, keep0, mean).abs()
    sign0 = torch.sign(_row_error(w, keep0, mean))
    for cycles in range(1, 12):
        keep, _ = dsnot_refine(w, keep0, score, mean, var, pattern, max_cycle_time=cycles, update_threshold=0.0, **kwargs)
        e = _row_error(w, keep, mean)
        assert bool((e.abs() <= prev + 1e-5).all())
        assert bool(((torch.sign(e) == sign0) | (e == 0)).all())
        prev = e.abs()
    assert not torch.equal(keep, keep0)  # something happened


# --- golden cases --------------------------------------------------------------------------------


def test_golden_unstructured_swap() -> None:
    """One row, mu' = 1, var = 1: D = W. Pruned {0, 1} (D 2, 1): e = 3 > 0.1.

    Cycle 1: grow the largest positive g (col 0, D 2); prune the front of the prune list, the
    weakest negative kept weight (col 3, D -0.5 has score 0.5 < col 2's 4): e = 3 - 0.5 - 2 = 0.5.
    Cycle 2: grow col 1 (D 1); the next negative is col 2 (D -4): e = 0.5 - 4 - 1 = -4.5, accepted
    (sign check off), |e| = 4.5; cycle 3: e < 0 grows the front of the growth list, which is kept
    weights' 0 -> g * e = 0, the row stops.
    """
    w = _t([[2.0, 1.0, -4.0, -0.5, 3.0]])
    keep0 = torch.tensor([[F, F, T, T, T]])
    score = w.abs()
    ones = torch.ones(5)
    keep, info = dsnot_refine(w, keep0, score, ones, ones, max_cycle_time=1)
    assert keep.tolist() == [[T, F, T, F, T]] and info["swaps"] == 1
    keep, info = dsnot_refine(w, keep0, score, ones, ones)
    assert keep.tolist() == [[T, T, F, F, T]] and info["swaps"] == 2 and info["cycles"] == 3
    keep, info = dsnot_refine(w, keep0, score, ones, ones, same_sign=True)
    assert keep.tolist() == [[T, F, T, F, T]] and info["swaps"] == 1
    # a prune-list order by a different score picks a different partner
    keep, _ = dsnot_refine(w, keep0, _t([[0, 0, 0.1, 9.0, 5.0]]), ones, ones, max_cycle_time=1)
    assert keep.tolist() == [[T, F, F, T, T]]


def test_golden_threshold_stops_row() -> None:
    w = _t([[0.05, -1.0, 2.0, 1.0]])
    keep0 = torch.tensor([[F, T, T, T]])
    ones = torch.ones(4)
    keep, info = dsnot_refine(w, keep0, w.abs(), ones, ones)  # |e| = 0.05 <= 0.1
    assert torch.equal(keep, keep0) and info["swaps"] == 0
    keep, info = dsnot_refine(w, keep0, w.abs(), ones, ones, update_threshold=0.0)
    assert keep.tolist() == [[T, F, T, T]] and info["swaps"] == 1


def test_official_nm_sign_check_can_increase_error() -> None:
    """2:4, D = W: prune {0, 1} (e = 0.7); grow col 0 (D 0.5) and prune the group's lowest kept score,
    col 2 (D 3): e -> 3.2, same sign, so the official rule accepts a larger |e|; monotone rejects it."""
    w = _t([[0.5, 0.2, 3.0, 5.0]])
    keep0 = torch.tensor([[F, F, T, T]])
    ones = torch.ones(4)
    keep, info = dsnot_refine(w, keep0, w.abs(), ones, ones, NMPattern(2, 4), max_cycle_time=1)
    assert keep.tolist() == [[T, F, F, T]] and info["mean_abs_error_after"] == pytest.approx(3.2)
    keep, info = dsnot_refine(w, keep0, w.abs(), ones, ones, NMPattern(2, 4), monotone=True)
    assert torch.equal(keep, keep0) and info["swaps"] == 0


def test_variance_power_changes_growth_choice() -> None:
    """g = D / var: col 0 (D 2, var 4 -> 0.5) loses to col 1 (D 1, var 1 -> 1); with p = 0 it wins."""
    w = _t([[2.0, 1.0, -3.0, 4.0]])
    keep0 = torch.tensor([[F, F, T, T]])
    mean, var = torch.ones(4), _t([4.0, 1.0, 1.0, 1.0])
    keep, _ = dsnot_refine(w, keep0, w.abs(), mean, var, max_cycle_time=1)
    assert keep.tolist() == [[F, T, F, T]]
    keep, _ = dsnot_refine(w, keep0, w.abs(), mean, var, max_cycle_time=1, pow_of_var_regrowing=0.0)
    assert keep.tolist() == [[T, F, F, T]]


def test_fully_pruned_and_fully_kept_rows_are_left_alone() -> None:
    w = _t([[1.0, 2.0, 3.0, 4.0], [1.0, -2.0, 3.0, -4.0]])
    keep0 = torch.tensor([[F, F, F, F], [T, T, T, T]])
    ones = torch.ones(4)
    keep, info = dsnot_refine(w, keep0, w.abs(), ones, ones, update_threshold=0.0)
    assert torch.equal(keep, keep0) and info["swaps"] == 0


# --- R²-DSnoT --------------------------------------------------------------------------------------


def _layer(seed: int, out: int = 24, inp: int = 48) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "weight": torch.randn(out, inp, generator=g),
        "act_norm": torch.rand(inp, generator=g) * 5 + 0.1,
        "mean_prime": torch.randn(inp, generator=g),
        "var": torch.rand(inp, generator=g) + 0.05,
    }


@pytest.mark.parametrize("pattern", [None, NMPattern(2, 4)])
@pytest.mark.parametrize("init", ["wanda", "ria"])
def test_r2_reduces_to_dsnot(pattern: NMPattern | None, init: str) -> None:
    """reweight=none, act_pow=1, gamma1=gamma2=0: R²-DSnoT == DSnoT with the official Wanda order."""
    lay = _layer(3)
    w, act = lay["weight"], lay["act_norm"]
    if init == "wanda":
        score = w.abs() * act[None, :]
        keep0 = select_mask(score, 0.5, group="row") if pattern is None else select_mask(score, pattern=pattern)
    else:
        score = (w.abs() * relative_weight(w)) * act.sqrt()[None, :]
        keep0 = select_mask(score, 0.5, group="layer") if pattern is None else select_mask(score, pattern=pattern)
    args = ("self_attn.q_proj", w, keep0, score, act, lay["mean_prime"], lay["var"], pattern)
    neutral = resolve_refine_params("r2-dsnot", {"reweight": "none", "act_pow": 1.0})
    r2, r2_info = refine_layer("r2-dsnot", neutral, *args)
    official = resolve_refine_params("dsnot", {"order": "wanda"})
    ds, ds_info = refine_layer("dsnot", official, *args)
    assert torch.equal(r2, ds) and r2_info == ds_info and ds_info["swaps"] > 0
    if init == "wanda":  # the default order ("initial") is the Wanda order here
        default, _ = refine_layer("dsnot", resolve_refine_params("dsnot", {}), *args)
        assert torch.equal(default, ds)
    # the R² defaults really change something
    r2_default, _ = refine_layer("r2-dsnot", resolve_refine_params("r2-dsnot", {}), *args)
    assert not torch.equal(r2_default, ds)


def test_r2_boundary_only_tightens_acceptance() -> None:
    """A positive gamma1 (cost of losing a large weight) never accepts more swaps than gamma = 0."""
    lay = _layer(4)
    w, act = lay["weight"], lay["act_norm"]
    keep0 = select_mask(w.abs() * act[None, :], 0.5, group="row")
    args = ("self_attn.q_proj", w, keep0, w.abs(), act, lay["mean_prime"], lay["var"], None)
    base, b_info = refine_layer("r2-dsnot", resolve_refine_params("r2-dsnot", {}), *args)
    strict, s_info = refine_layer("r2-dsnot", resolve_refine_params("r2-dsnot", {"gamma1": 5.0}), *args)
    assert s_info["swaps"] < b_info["swaps"]
    assert torch.equal(keep0.sum(1), strict.sum(1)) and torch.equal(keep0.sum(1), base.sum(1))


def test_default_skip_layer_is_the_official_mlp() -> None:
    assert resolve_refine_params("dsnot", {})["skip_layer"] == "mlp"
    assert resolve_refine_params("r2-dsnot", {})["skip_layer"] == "mlp"


def test_skip_layer_follows_official_name_rule() -> None:
    lay = _layer(5)
    w, act = lay["weight"], lay["act_norm"]
    keep0 = select_mask(w.abs() * act[None, :], 0.5, group="row")
    params = resolve_refine_params("dsnot", {"skip_layer": "mlp"})
    for name, skipped in (("mlp.down_proj", True), ("self_attn.o_proj", False)):
        keep, info = refine_layer("dsnot", params, name, w, keep0, w.abs(), act, lay["mean_prime"], lay["var"], None)
        assert torch.equal(keep, keep0) is skipped and info.get("skipped", False) is skipped


# --- statistics ------------------------------------------------------------------------------------


def test_mean_var_accumulator_matches_official_per_sequence_update() -> None:
    g = torch.Generator().manual_seed(6)
    seqs = torch.randn(5, 7, 6, generator=g) * 3 + 1
    acc = MeanVarAccumulator(6, torch.device("cpu"))
    for chunk in seqs.split(2):
        acc.add(chunk)
    # official WrappedGPT.add_batch, one sequence per call
    mean = var = sum_metric = None
    ntok = nseq = 0
    for s in seqs:
        x = s.T  # (in, tokens)
        m, v = x.mean(1), x.var(1, unbiased=False)
        var = v if ntok == 0 else (var * ntok + v * 7) / (ntok + 7)
        mean = m if ntok == 0 else (mean * ntok + m * 7) / (ntok + 7)
        ntok += 7
        sum_metric = torch.zeros(6) if sum_metric is None else sum_metric * nseq / (nseq + 1)
        nseq += 1
        sum_metric = sum_metric + x.sum(1) / nseq
    torch.testing.assert_close(acc.mean_prime(), sum_metric, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(acc.var(), var, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(acc.mean_prime(), 7 * mean, rtol=1e-5, atol=1e-5)  # seqlen x mean


# --- parameters ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("refine", "params", "message"),
    [
        ("dsnot", {"max_cycle_time": -1}, "max_cycle_time=-1"),
        ("dsnot", {"max_cycle_time": 2.5}, "max_cycle_time=2.5"),
        ("dsnot", {"update_threshold": math.nan}, "update_threshold=nan"),
        ("dsnot", {"skip_layer": "attn"}, "skip_layer='attn'"),
        ("dsnot", {"order": "random"}, "order='random'"),
        ("dsnot", {"same_sign": "yes"}, "same_sign='yes'"),
        ("dsnot", {"reweight": "grow"}, "has no parameter 'reweight'"),
        ("dsnot", {"pow_of_var_pruning": 1}, "has no parameter 'pow_of_var_pruning'"),
        ("r2-dsnot", {"reweight": "both"}, "reweight='both'"),
        ("r2-dsnot", {"p": 0}, "p=0"),
        ("r2-dsnot", {"gamma1": -1}, "gamma1=-1"),
        ("r2-dsnot", {"order": "wanda"}, "has no parameter 'order'"),
        ("nosuch", {}, "unknown refinement 'nosuch'"),
        (None, {"max_cycle_time": 3}, "no refinement"),
    ],
)
def test_bad_params(refine: str | None, params: dict, message: str) -> None:
    with pytest.raises(CrepeError, match=message.replace("(", r"\(").replace("[", r"\[")):
        resolve_refine_params(refine, params)


def test_defaults_are_the_official_ones() -> None:
    p = resolve_refine_params("dsnot", {})
    assert (p["max_cycle_time"], p["update_threshold"], p["pow_of_var_regrowing"]) == (50, 0.1, 1.0)
    assert p["same_sign"] is None and p["order"] == "initial" and p["skip_layer"] == "mlp"
    r2 = resolve_refine_params("r2-dsnot", {})
    assert (r2["reweight"], r2["act_pow"], r2["gamma1"], r2["gamma2"]) == ("grow", 0.5, 0.0, 0.0)
