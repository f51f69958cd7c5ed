"""The computed findings of the docs reports (bench/pho_report.py, bench/extensions_report.py)."""

from __future__ import annotations

import json

from bench.extensions_report import _tally, directions, key
from bench.pho_report import _constant_proxies, _findings

NAMES = ["gini_pruned", "gini_retained", "outlier", "outlier_pruned", "outlier_retained"]


def _row(table, method, sparsity, refine=None, allocation=None, ppl=None, error=None):
    run = {"table": table, "method": method, "sparsity": sparsity, "refine": refine, "allocation": allocation}
    return key(run), {**run, "ppl": ppl, **({"error": error} if error else {})}


def test_tally_counts_and_names_the_exceptions():
    line = _tally("claim", [("a", 1.0, 2.0), ("b", 3.0, 2.0), ("c", None, 1.0)])
    assert "partly agrees (holds in 1 of 2 cases)" in line and "b (3.00 vs 2.00)" in line and "a (" not in line
    assert "agrees (holds in 2 of 2" in _tally("claim", [("a", 1.0, 2.0), ("b", 1.0, 2.0)])
    assert "disagrees (holds in 0 of 1" in _tally("claim", [("a", 2.0, 2.0)])  # a tie is not an improvement
    assert _tally("claim", [("a", None, 2.0)]) is None


def test_directions_reads_every_table():
    done = dict([
        _row("a", "crepe", "2:4", ppl=10.0), _row("a", "crepe", "2:4", "cp", ppl=9.0), _row("a", "crepe", "2:4", "lsa", ppl=8.0),
        _row("a", "ria", "2:4", "lsa", ppl=7.0),
        _row("b", "crepe", "0.7", ppl=50.0), _row("b", "crepe", "0.7", allocation="dlp", ppl=30.0),
        _row("b", "ria", "0.7", allocation="dlp", ppl=40.0),
        _row("b", "crepe", "0.7", allocation="alpha", error="refused"),
        _row("c", "crepe", "0.6", ppl=20.0), _row("c", "crepe", "0.6", "dsnot", ppl=25.0),
    ])
    text = "\n".join(directions(done))
    assert "channel permutation improves every N:M method (+ CP < plain): agrees (holds in 1 of 1" in text
    assert "CRePE + LSA beats RIA + LSA: disagrees (holds in 0 of 1" in text
    assert "non-uniform allocation beats uniform at 70%: agrees (holds in 1 of 1" in text  # the refused cell is skipped
    assert "the best is crepe + DLP (30.00)" in text and "so this disagrees" not in text
    assert "DSnoT improves every method (+ DSnoT < plain): disagrees" in text
    assert "R²-DSnoT" not in text  # no rows: no claim


def _report(hc_seconds: float, pho_test: float, hc_test: float) -> dict:
    pho = {"final": {"params": {}, "validation_ppl": 9.0, "test_ppl": pho_test},
           "totals": {"pho_seconds": 10.0}}
    return {"settings": {"top_k": 3, "hc_evals": 8, "hc_evals_main": 20},
            "patterns": {"2:4": {"ria_validation": 10.0, "ria_test": 12.0,
                                 "proxy_study": {"spearman": {"gini_pruned": 0.8}},
                                 "pho": {"cmaes": pho},
                                 "hill_climb": {"final": {"test_ppl": hc_test},
                                                "totals": {"eval_seconds": hc_seconds}}}}}


def test_pho_findings_state_targets_as_measured(tmp_path):
    slow = _findings(_report(30.0, 12.5, 12.0), tmp_path, ["2:4"], NAMES)
    assert "3.0x to 3.0x" in slow and "**not met**" in slow
    assert "within 1% of hill climbing's in 0 of 1" in slow
    assert "did not carry over to the test split for cmaes at 2:4 (12.50 vs RIA 12.00)" in slow
    assert "ranks configurations like perplexity" in slow
    fast = _findings(_report(200.0, 11.0, 11.05), tmp_path, ["2:4"], NAMES)
    assert "the ≥10x target is met" in fast and "in 1 of 1" in fast and "carry over" not in fast


def test_constant_proxies_are_named(tmp_path):
    study = tmp_path / "2-4" / "proxy-study"
    study.mkdir(parents=True)
    rows = [{"proxies": {"gini_pruned": g, "gini_retained": g, "outlier": 1.0, "outlier_pruned": 0.0,
                         "outlier_retained": g}} for g in (0.1, 0.2, 0.3)]
    (study / "proxy_study.json").write_text(json.dumps({"rows": rows}))
    assert _constant_proxies(tmp_path, "2-4", NAMES) == {"outlier": 1.0, "outlier_pruned": 0.0}
    assert _constant_proxies(tmp_path, "50pct", NAMES) == {}


def _zs(method, pattern, avg, params=None):
    return {"method": method, "pattern": pattern, "params": params or {}, "zero_shot": {"average_acc": avg}}


def test_zero_shot_findings_compare_with_dense_and_noise():
    from tasks.zeroshot_report import findings as zs_findings

    ria_point = {"alpha": 1.0, "beta": 1.0, "gamma": 0.0}
    rows = [_zs("dense", "-", 0.40), _zs("wanda", "50%", 0.38), _zs("ria", "50%", 0.30),
            _zs("crepe", "50%", 0.30, ria_point), _zs("ria", "2:4", 0.33), _zs("crepe", "2:4", 0.34, {"gamma": 1e-4})]
    text = zs_findings(rows, 4.0)
    lines = text.splitlines()
    assert lines[0].startswith("- 50%: the highest average acc is wanda (38.00)")
    assert "wanda -2.00, ria -10.00, crepe -10.00 points vs dense" in lines[0]
    assert "spread between methods is 8.00 points, above the noise" in lines[0] and "CRePE is RIA here" in lines[0]
    assert "highest average acc is crepe (34.00)" in lines[1] and "within the noise" in lines[1]
    assert "CRePE is RIA" not in lines[1]


def test_transfer_summary_compares_with_ria_and_own_pho():
    from tasks.transfer import transfer_summary

    rows = [
        {"model": "m", "pattern": "2:4", "config": "ria", "params": {}, "test_ppl": 200.0},
        {"model": "m", "pattern": "2:4", "config": "transfer from s 2:4", "params": {}, "test_ppl": 190.0},
        {"model": "m", "pattern": "2:4", "config": "own PHO", "params": {}, "test_ppl": 180.0},
        {"model": "g", "pattern": "4:8", "config": "ria", "params": {}, "test_ppl": 100.0},
        {"model": "g", "pattern": "4:8", "config": "transfer from s 2:4", "params": {}, "test_ppl": 110.0},
    ]
    lines = transfer_summary(rows)
    assert lines == [
        "- m at 2:4: transferred 190.00 vs RIA 200.00 (-5.00%, better than RIA); the target's own PHO 180.00 "
        "(+5.56% for the transfer).",
        "- g at 4:8: transferred 110.00 vs RIA 100.00 (+10.00%, not better than RIA).",
    ]
