"""The crepe CLI: the happy path on a tiny local model, and one clear sentence + exit 2 for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main
from tests.local_models import save_tiny_llama

HERMETIC = ["--calib-source", "pydoc", "--eval-source", "pydoc", "--calib-samples", "4", "--seqlen", "32",
            "--max-windows", "2", "--batch-size", "2"]
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("cli") / "tiny")


@pytest.fixture(scope="module")
def tiny_nan(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("cli") / "nan", nan_layer="model.layers.1.mlp.down_proj")


def run(argv, capsys):
    try:
        code = main(["--no-progress", *argv])
    except SystemExit as exc:  # argparse errors
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("crepe: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# --- happy path ---------------------------------------------------------------------------------


def test_prune_writes_loadable_folder_and_manifest(tiny, tmp_path, capsys):
    out = tmp_path / "pruned"
    code, stdout, err = run(["prune", "--model", str(tiny), "--method", "crepe", "--sparsity", "2:4",
                             "--kernel-size", "3", "--gamma", "0.1", "--out", str(out), "--eval-split",
                             "validation", *HERMETIC], capsys)
    assert code == 0, err
    assert "14 weight matrices pruned (14 linear 0.5000)" in stdout
    assert "calibration: 4 x 32 tokens from pydoc" in stdout
    manifest = json.loads((out / "crepe_manifest.json").read_text())
    assert manifest["prune"]["config"]["method"] == "crepe"
    assert manifest["prune"]["config"]["pattern"] == "2:4"
    assert manifest["prune"]["config"]["params"]["gamma"] == 0.1
    assert manifest["prune"]["config"]["params"]["kernel_size"] == 3
    assert manifest["prune"]["nm_valid"] is True
    assert manifest["model"]["content_hash"] and manifest["data"]["calibration"]["source"] == "pydoc"
    assert manifest["data"]["calibration"]["sha256"]
    assert manifest["seed"] == 0 and manifest["versions"]["torch"] and manifest["code"]["source_sha256"]
    assert manifest["evaluation"]["split"] == "validation" and manifest["evaluation"]["ppl"] > 1
    assert set(manifest["files"]) >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert all(layer["sparsity"] >= 0.5 for layer in manifest["prune"]["layers"])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    w = model.model.layers[0].self_attn.q_proj.weight
    assert (w.reshape(w.shape[0], -1, 4) == 0).sum(-1).min() >= 2
    assert not list(tmp_path.glob(".pruned.*")), "temporary folders left behind"


def test_eval_prints_ppl_and_writes_json(tiny, tmp_path, capsys):
    target = tmp_path / "ppl.json"
    code, stdout, err = run(["eval", "--model", str(tiny), "--split", "test", "--json", str(target), *HERMETIC], capsys)
    assert code == 0, err
    assert "perplexity" in stdout
    result = json.loads(target.read_text())
    assert result["perplexity"]["n_windows"] == 2 and result["perplexity"]["seqlen"] == 32


def test_params_from_file_and_flag_override(tiny, tmp_path, capsys):
    params = tmp_path / "search.json"
    params.write_text(json.dumps({"winner": {"params": {"alpha": 0.5, "beta": 1.5, "gamma": 0.001}}}))
    out = tmp_path / "o"
    code, _, err = run(["prune", "--model", str(tiny), "--method", "crepe", "--sparsity", "0.5", "--params-from",
                        str(params), "--beta", "0.25", "--kernel-size", "3", "--out", str(out), *HERMETIC], capsys)
    assert code == 0, err
    used = json.loads((out / "crepe_manifest.json").read_text())["prune"]["config"]["params"]
    assert (used["alpha"], used["beta"], used["gamma"]) == (0.5, 0.25, 0.001)


def test_overwrite_replaces_existing_output(tiny, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "old.txt").write_text("old")
    code, _, err = run(["prune", "--model", str(tiny), "--method", "magnitude", "--sparsity", "0.5", "--out", str(out),
                        "--overwrite", *HERMETIC], capsys)
    assert code == 0, err
    assert not (out / "old.txt").exists() and (out / "crepe_manifest.json").exists()


# --- bad input: exit 2, one sentence, nothing written ---------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "foo", "--sparsity", "0.5"], "argument --method: invalid choice: 'foo'"),
        (["--method", "crepe", "--sparsity", "1.5"], "outside [0, 1)"),
        (["--method", "crepe", "--sparsity", "-0.1"], "outside [0, 1)"),
        (["--method", "crepe", "--sparsity", "3:2"], "invalid N:M pattern 3:2"),
        (["--method", "crepe", "--sparsity", "0:4"], "invalid N:M pattern 0:4"),
        (["--method", "crepe", "--sparsity", "2:0"], "invalid N:M pattern 2:0"),
        (["--method", "crepe", "--sparsity", "a:b"], "invalid N:M pattern 'a:b'"),
        (["--method", "crepe", "--sparsity", "half"], "'half' is neither"),
        (["--method", "crepe", "--sparsity", "0.5", "--kernel-size", "4"], "kernel_size 4"),
        (["--method", "crepe", "--sparsity", "0.5", "--gamma", "-1"], "gamma=-1.0"),
        (["--method", "crepe", "--sparsity", "0.5", "--alpha", "0", "--beta", "0", "--gamma", "0"], "all 0"),
        (["--method", "wanda", "--sparsity", "0.5", "--alpha", "1"], "--alpha 1.0: unknown key 'prune.params.alpha': method 'wanda' has parameters: none"),
        (["--method", "crepe", "--sparsity", "0.5", "--model", "no such model"], "unknown model spec"),
        (["--method", "crepe", "--sparsity", "0.5", "--model", "./missing-folder"], "does not exist"),
        (["--method", "crepe", "--sparsity", "0.5", "--model", "embedded:nope"], "unknown embedded model"),
        (["--method", "ria", "--sparsity", "0.5", "--data-dir", "/nonexistent/data"], "data directory"),
    ],
)
def test_prune_bad_input(args, message, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(["prune", "--out", str(out), *args], capsys)
    assert code == 2
    assert message in error_line(err)
    assert not out.exists()


def test_prune_refuses_nonempty_out_without_overwrite(tiny, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, _, err = run(["prune", "--model", str(tiny), "--method", "ria", "--sparsity", "0.5", "--out", str(out)], capsys)
    assert code == 2 and "--overwrite" in error_line(err)
    assert (out / "keep.txt").read_text() == "precious" and len(list(out.iterdir())) == 1


def test_prune_refuses_pattern_not_dividing_width(tiny, tmp_path, capsys):
    out = tmp_path / "o"
    code, _, err = run(["prune", "--model", str(tiny), "--method", "ria", "--sparsity", "3:7", "--out", str(out), *HERMETIC], capsys)
    assert code == 2 and "not divisible by M=7" in error_line(err)
    assert not out.exists()


def test_prune_refuses_nan_weights_naming_the_layer(tiny_nan, tmp_path, capsys):
    out = tmp_path / "o"
    code, _, err = run(["prune", "--model", str(tiny_nan), "--method", "wanda", "--sparsity", "0.5", "--out", str(out), *HERMETIC], capsys)
    assert code == 2 and "model.layers.1.mlp.down_proj" in error_line(err)
    assert not out.exists()


def test_eval_fewer_tokens_than_one_window(tiny, capsys):
    code, _, err = run(["eval", "--model", str(tiny), "--eval-source", "pydoc", "--seqlen", "10000000"], capsys)
    assert code == 2 and "fewer than one window" in error_line(err)


def test_eval_corrupt_weights(tiny, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    code, _, err = run(["eval", "--model", str(broken)], capsys)
    assert code == 2 and "truncated" in error_line(err)


def test_empty_calibration_corpus(tiny, tmp_path, capsys):
    (tmp_path / "c4").mkdir()
    (tmp_path / "c4" / "c4_en_validation_subset_2k.jsonl").write_text("")
    code, _, err = run(["prune", "--model", str(tiny), "--method", "ria", "--sparsity", "0.5", "--out",
                        str(tmp_path / "o"), "--data-dir", str(tmp_path), "--calib-source", "c4-local"], capsys)
    assert code == 2 and "is empty" in error_line(err)


def test_bad_int_flag_is_an_argparse_error(capsys):
    code, _, err = run(["eval", "--max-windows", "0"], capsys)
    assert code == 2 and "must be a positive integer" in err and "Traceback" not in err


def test_real_process_exit_status_and_no_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "prune", "--method", "crepe", "--sparsity", "2:0", "--out", str(tmp_path / "x")],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "crepe: error: --sparsity 2:0: invalid N:M pattern 2:0; need integers with 1 <= N < M (N zeros in every M weights), e.g. 2:4 or 4:8"


def test_methods_lists_registry(capsys):
    code, stdout, _ = run(["methods"], capsys)
    assert code == 0 and all(m in stdout for m in ("magnitude", "wanda", "ria", "crepe"))


def test_table_and_demo_compare_methods_on_one_budget(tiny, tmp_path, capsys, monkeypatch):
    """`crepe table` / `crepe demo`: dense plus every (method, pattern) on one calibration set and one set of
    evaluation windows, from fresh copies of the model; the report and the JSON say what was measured."""
    monkeypatch.chdir(tmp_path)  # no params.yaml here: the commands' own small budgets, then the flags
    md, raw = tmp_path / "results.md", tmp_path / "results.json"
    code, stdout, err = run(["table", "--model", str(tiny), "--methods", "dense,magnitude,wanda", "--patterns",
                             "0.5,2:4", "--out", str(md), "--json", str(raw), *HERMETIC], capsys)
    assert code == 0, err
    result = json.loads(raw.read_text())
    assert [(r["method"], r["pattern"]) for r in result["rows"]] == [
        ("dense", "-"), ("magnitude", "50%"), ("wanda", "50%"), ("magnitude", "2:4"), ("wanda", "2:4")]
    dense = result["rows"][0]["ppl"]
    assert all(r["ppl"] > 1 for r in result["rows"]) and all(r["ppl"] != dense for r in result["rows"][1:])
    assert all(r["sparsity"] == pytest.approx(0.5, abs=1e-3) for r in result["rows"][1:])
    assert result["calibration"]["n_samples"] == 4 and result["calibration"]["seqlen"] == 32
    assert result["evaluation"]["max_windows"] == 2 and result["evaluation"]["seqlen"] == 32
    text = md.read_text()
    assert "| method | 50% | 2:4 |" in text and f"| dense | {dense:.3f} | {dense:.3f} |" in text
    demo = tmp_path / "demo.json"
    code, stdout, err = run(["demo", "--model", str(tiny), "--json", str(demo), *HERMETIC], capsys)
    assert code == 0, err
    rows = json.loads(demo.read_text())["rows"]
    assert [(r["method"], r["pattern"]) for r in rows] == [("dense", "-"), ("ria", "2:4"), ("crepe", "2:4")]
    assert rows[0]["ppl"] == pytest.approx(dense)  # the same model, data and windows


def test_prune_with_obs_update_keeps_the_mask_and_calibrates_magnitude(tiny, tmp_path, capsys):
    """--update obs (prune.update): the scorer's mask, the kept weights reconstructed; magnitude calibrates."""
    from safetensors.torch import load_file

    plain, updated = tmp_path / "plain", tmp_path / "obs"
    for out, extra in ((plain, []), (updated, ["--update", "obs"])):
        code, stdout, err = run(["prune", "--model", str(tiny), "--method", "magnitude", "--sparsity", "2:4",
                                 "--out", str(out), *extra, *HERMETIC], capsys)
        assert code == 0, err
    assert "update obs:" in stdout and "calibration: 4 x 32 tokens" in stdout
    manifest = json.loads((updated / "crepe_manifest.json").read_text())
    assert manifest["prune"]["config"]["update"] == "obs" and manifest["data"]["calibration"] is not None
    a, b = load_file(plain / "model.safetensors"), load_file(updated / "model.safetensors")
    pruned = [k for k in a if "proj" in k]
    assert pruned and all(((a[k] == 0) == (b[k] == 0)).all() for k in pruned)  # magnitude: the same mask everywhere
    assert any(not (a[k] == b[k]).all() for k in pruned)  # the kept weights were reconstructed
    code, _, err = run(["prune", "--model", str(tiny), "--method", "sparsegpt", "--sparsity", "0.5", "--update", "obs",
                        "--out", str(tmp_path / "x"), *HERMETIC], capsys)
    assert code == 2 and "already reconstructs" in error_line(err) and not (tmp_path / "x").exists()
