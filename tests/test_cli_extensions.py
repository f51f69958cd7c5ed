"""`crepe prune` with --method sparsegpt, --refine and --allocation: manifests record the new
fields; nonsensical combinations exit 2 with one sentence naming the conflicting options."""

from __future__ import annotations

import json

import pytest

from tests.local_models import save_tiny_llama
from tests.test_cli import HERMETIC, error_line, run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("cli_ext") / "tiny")


def test_prune_sparsegpt_manifest(tiny, tmp_path, capsys):
    out = tmp_path / "sgpt"
    code, stdout, err = run(["prune", "--model", str(tiny), "--method", "sparsegpt", "--sparsity", "0.5",
                             "--out", str(out), *HERMETIC], capsys)
    assert code == 0, err
    assert "with sparsegpt at 50%" in stdout and "warning" not in stdout
    prune = json.loads((out / "crepe_manifest.json").read_text())["prune"]
    assert prune["config"]["method"] == "sparsegpt" and prune["config"]["group"] == "block128"
    assert prune["config"]["params"] == {"blocksize": 128, "percdamp": 0.01, "max_damp_retries": 3}
    assert prune["damping_retries"] == []
    assert all(layer["info"]["sparsegpt"]["percdamp"] == 0.01 for layer in prune["layers"])
    assert all(layer["mask_pruned"] == layer["numel"] // 2 for layer in prune["layers"])  # 64- and 128-wide


def test_prune_dsnot_with_params_manifest(tiny, tmp_path, capsys):
    out = tmp_path / "dsnot"
    code, stdout, err = run(["prune", "--model", str(tiny), "--method", "ria", "--sparsity", "0.6", "--refine", "dsnot",
                             "--refine-param", "skip_layer=mlp", "--refine-param", "max-cycle-time=20",
                             "--out", str(out), *HERMETIC], capsys)
    assert code == 0, err
    assert "with ria + dsnot at 60%" in stdout and "dsnot_swaps" in stdout
    prune = json.loads((out / "crepe_manifest.json").read_text())["prune"]
    assert prune["config"]["refine"] == "dsnot"
    assert prune["config"]["refine_params"]["skip_layer"] == "mlp"
    assert prune["config"]["refine_params"]["max_cycle_time"] == 20
    assert prune["refine_summary"]["dsnot_layers_skipped"] == 6
    attn = [layer for layer in prune["layers"] if "self_attn" in layer["name"]]
    assert all("swaps" in layer["info"]["dsnot"] for layer in attn)


def test_prune_allocation_and_permutation(tiny, tmp_path, capsys):
    pytest.importorskip("crepe.allocation")
    pytest.importorskip("crepe.permute")
    out = tmp_path / "owl"
    code, stdout, err = run(["prune", "--model", str(tiny), "--method", "wanda", "--sparsity", "0.7", "--allocation",
                             "owl", "--allocation-param", "lam=0.05", "--out", str(out), *HERMETIC], capsys)
    assert code == 0, err
    assert "owl sparsity per block" in stdout
    prune = json.loads((out / "crepe_manifest.json").read_text())["prune"]
    assert prune["config"]["allocation_params"] == {"m": 5.0, "lam": 0.05}
    assert len(prune["block_sparsity"]) == 2 and sum(prune["block_sparsity"]) / 2 == pytest.approx(0.7)
    out = tmp_path / "lsa"
    code, stdout, err = run(["prune", "--model", str(tiny), "--method", "sparsegpt", "--sparsity", "2:4", "--refine",
                             "lsa", "--out", str(out), *HERMETIC], capsys)
    assert code == 0, err
    prune = json.loads((out / "crepe_manifest.json").read_text())["prune"]
    assert prune["nm_valid"] is True and prune["config"]["refine"] == "lsa"
    assert all("gain" in layer["info"]["permutation"] for layer in prune["layers"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "ria", "--sparsity", "2:4", "--allocation", "owl"], "cannot be combined with the N:M pattern 2:4"),
        (["--method", "ria", "--sparsity", "0.5", "--refine", "cp"], "--refine cp: refine.method 'cp' works on N:M patterns only"),
        (["--method", "wanda", "--sparsity", "0.5", "--refine", "lsa"], "--refine lsa: refine.method 'lsa' works on N:M patterns only"),
        (["--method", "ria", "--sparsity", "0.5", "--refine", "nope"], "invalid choice: 'nope'"),
        (["--method", "ria", "--sparsity", "0.5", "--allocation", "even"], "invalid choice: 'even'"),
        (["--method", "ria", "--sparsity", "0.5", "--refine-param", "max_cycle_time=3"], "refine method 'none' has parameters: none"),
        (["--method", "ria", "--sparsity", "0.5", "--allocation-param", "m=5"], "allocation method 'none' has parameters: none"),
        (["--method", "ria", "--sparsity", "0.5", "--refine", "dsnot", "--refine-param", "cycles=3"], "unknown key 'refine.params.cycles': refine method 'dsnot' has parameters: max_cycle_time"),
        (["--method", "ria", "--sparsity", "0.5", "--refine", "dsnot", "--refine-param", "skip_layer=attn"], "skip_layer='attn'"),
        (["--method", "ria", "--sparsity", "0.5", "--refine", "dsnot", "--refine-param", "novalue"], "is not KEY=VALUE"),
        (["--method", "sparsegpt", "--sparsity", "0.5", "--group", "row"], "does not apply to method 'sparsegpt'"),
        (["--method", "sparsegpt", "--sparsity", "0.5", "--gamma", "1"], "--gamma 1.0: unknown key 'prune.params.gamma': method 'sparsegpt' has parameters: blocksize"),
        (["--method", "ria", "--sparsity", "0.7", "--allocation", "owl", "--allocation-param", "lam=-1"], "lam=-1"),
    ],
)
def test_bad_combinations_exit_2_with_one_line(args, message, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(["prune", "--out", str(out), *args], capsys)
    assert code == 2
    assert message in error_line(err)
    assert not out.exists()


def test_methods_lists_sparsegpt_and_refinements(capsys):
    code, stdout, _ = run(["methods"], capsys)
    assert code == 0
    assert "sparsegpt" in stdout and "blocksize=128" in stdout
    assert all(r in stdout for r in ("dsnot", "r2-dsnot", "cp", "lsa", "owl", "alpha", "dlp"))
