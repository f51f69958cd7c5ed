"""Releases (issue 4 §10): write_release's folder, model card (huggingface_hub ModelCard) and manifest;
verify_release and `crepe verify` on good, tampered, incomplete and inconsistent releases; nothing
half-written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

from crepe.budget import Budget
from crepe.errors import CrepeError
from crepe.io import sha256_file
from crepe.measure import SmokeTest
from crepe.models import load_model
from crepe.prune_config import build_config
from crepe.run import prune_loaded
from flows.cli import main
from tasks.card import CARD, render_model_card
from tasks.release import search_reference, write_release
from tasks.verify import RELEASE_MANIFEST, ReleaseError, verify_release
from tests.local_models import save_tiny_llama

REPO = Path(__file__).resolve().parent.parent
BUDGET = Budget(calib_samples=4, seqlen=32, batch_size=2, calib_source="pydoc", eval_source="pydoc")
SMOKE = SmokeTest(split="validation", seqlen=32, max_windows=2, source="pydoc", batch_size=2)
Q_PROJ = "model.layers.0.self_attn.q_proj"


def _pruned(tiny: Path, sparsity: str = "2:4"):
    lm = load_model(str(tiny))
    config = build_config("crepe", sparsity, {"kernel_size": 3, "gamma": 0.05})
    report, record = prune_loaded(lm, config, BUDGET)
    return lm, config, report, {"calibration": record}


def _manifest(lm, prune_config, data, **extra):
    base = {k: v for k, v in lm.info.as_dict().items() if k != "load_seconds"}  # keep time out: byte-identical
    return {"base_model": base, "prune": prune_config.as_dict(), "data": data, **extra}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("rel") / "tiny")


@pytest.fixture(scope="module")
def pruned(tiny):
    return _pruned(tiny)


@pytest.fixture(scope="module")
def release(pruned, tmp_path_factory):
    lm, config, _, data = pruned
    summary = tmp_path_factory.mktemp("search") / "pho.json"
    summary.write_text(json.dumps({"winner": {"index": 1, "params": {"alpha": 0.5}, "ppl": 9.5}, "trials": []}))
    manifest = _manifest(lm, config, data, config={"prune": {"method": "crepe"}}, search=search_reference(summary),
                         metrics={"ppl": {"value": 123.25, "split": "test", "seqlen": 32, "n_windows": 2}})
    out = tmp_path_factory.mktemp("out") / "release"
    return write_release(lm.model, lm.tokenizer, out, manifest, {"license": "apache-2.0", "tags": ["demo"]}, smoke=SMOKE)


@pytest.fixture
def copy(release, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(release, target)
    return target


def _manifest_of(folder: Path) -> dict:
    return json.loads((folder / RELEASE_MANIFEST).read_text())


def _rewrite_manifest(folder: Path, change) -> None:
    data = _manifest_of(folder)
    change(data)
    (folder / RELEASE_MANIFEST).write_text(json.dumps(data))


def _edit_weights(folder: Path, edit) -> None:
    """Change the safetensors weights with ``edit(tensors)`` and record the new hash (hashes then pass)."""
    file = folder / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    _rewrite_manifest(folder, lambda m: m["files"]["model.safetensors"].update(sha256=sha256_file(file)))


# --- writing --------------------------------------------------------------------------------------


def test_release_folder_holds_model_card_and_manifest_with_every_hash(release, pruned):
    lm, config, report, data = pruned
    manifest = _manifest_of(release)
    names = {p.name for p in release.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", CARD, RELEASE_MANIFEST} <= names
    assert set(manifest["files"]) == names - {RELEASE_MANIFEST}
    for name, entry in manifest["files"].items():
        assert entry == {"sha256": sha256_file(release / name), "bytes": (release / name).stat().st_size}
    assert manifest["kind"] == "crepe-release" and manifest["version"] == 1
    # lineage from the caller, kept as given
    assert manifest["base_model"]["content_hash"] == lm.info.content_hash
    assert manifest["prune"]["pattern"] == "2:4" and manifest["prune"]["params"]["gamma"] == 0.05
    assert manifest["data"]["calibration"]["sha256"] == data["calibration"]["sha256"]
    assert manifest["search"]["sha256"] and manifest["search"]["winner"]["ppl"] == 9.5
    assert manifest["config"] == {"prune": {"method": "crepe"}}
    # what write_release measured and recorded itself
    sp = manifest["sparsity"]
    assert sp["n_linears"] == 14 and sp["nm_valid"] is True and sp["overall"] == pytest.approx(0.5)
    assert [layer["zeros"] for layer in sp["layers"]] == [layer.n_zeros for layer in report.layers]
    smoke = manifest["smoke_test"]
    assert smoke["n_windows"] == 2 and smoke["seqlen"] == 32 and smoke["data"]["source"] == "pydoc"
    assert smoke["ppl"] > 1
    assert manifest["code"]["source_sha256"] and manifest["versions"]["torch"] == torch.__version__
    assert "platform" in manifest["machine"]


def test_model_card_states_lineage_metrics_and_the_honest_note(release, pruned):
    lm, _, _, data = pruned
    card = (release / CARD).read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["license"] == "apache-2.0" and "demo" in front["tags"] and "2of4-sparsity" in front["tags"]
    assert f"`{lm.info.spec}`" in card and lm.info.content_hash[:16] in card
    assert "Method: `crepe`, 2:4" in card and "gamma=0.05" in card and "kernel_size=3" in card
    assert "found by PHO" in card
    assert data["calibration"]["sha256"][:16] in card
    assert "| ppl | 123.25 |" in card and "smoke-test perplexity" in card
    assert "Measured sparsity: 0.5000 over 14 pruned weight matrices" in card
    assert "Unstructured sparsity makes the files no smaller and inference no faster in standard runtimes" in card
    assert "only by runtimes that use them" in card


def test_card_base_model_metadata_for_embedded_and_hub_models():
    record = {"base_model": {"spec": "embedded:smollm2-135m", "kind": "embedded", "content_hash": "ab"},
              "prune": {"method": "ria", "sparsity": 0.5, "pattern": None, "params": {}},
              "sparsity": {"pattern": None, "overall": 0.5, "n_linears": 1, "blocks_path": "m", "total_zeros": 1,
                           "total_numel": 2, "nm_valid": None},
              "code": {}, "versions": {}}
    card = render_model_card(record, {})
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "50% unstructured" in card
    record["base_model"] = {"spec": "hf:org/name@v1", "kind": "hub", "content_hash": "cd",
                            "hub": {"repo_id": "org/name", "revision": "v1", "commit": "e" * 40, "files": {}}}
    card = render_model_card(record, {})
    assert "base_model: org/name\n" in card and f"hub repo `org/name` at commit `{'e' * 40}`" in card


def test_card_metadata_is_a_hub_model_card(release):
    card = ModelCard.load(release / CARD)
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert data["license"] == "apache-2.0" and data["tags"][-1] == "demo"
    assert "base_model" not in data and "base_model_relation" not in data  # a local folder has no hub id
    assert str(card) == (release / CARD).read_text()  # written exactly as huggingface_hub renders it


def _sparse_record() -> dict:
    """A manifest record with every optional value missing or None."""
    return {"base_model": {"spec": "local/folder", "kind": None, "content_hash": None, "hub": None},
            "prune": {"method": "wanda", "sparsity": 0.5, "pattern": "2:4", "params": {"alpha": None},
                      "group": "row", "rule": None},
            "sparsity": {"pattern": "2:4", "overall": 0.5, "n_linears": None, "blocks_path": None,
                         "total_zeros": None, "total_numel": None, "nm_valid": True},
            "data": {"calibration": {"source": None, "path": None, "sha256": None, "n_samples": 4, "seqlen": None,
                                     "seed": None},
                     "evaluation": None},
            "metrics": {"ppl": {"value": None, "split": None, "seqlen": 32}, "acc": None},
            "smoke_test": {"ppl": 12.5, "split": None, "seqlen": 32, "n_windows": None, "data": {"source": None}},
            "search": {"path": None, "sha256": None},
            "code": {"crepe_version": None, "git_sha": None, "source_sha256": None},
            "versions": {"torch": None, "python": "3.12"}}


def test_card_never_prints_none_and_is_deterministic():
    record = _sparse_record()
    card = render_model_card(record, {"license": None, "language": None, "tags": None})
    assert "None" not in card and "not recorded" in card
    assert "- Evaluation: not recorded." in card and "| acc | not recorded | |" in card
    assert "| ppl | not recorded | seqlen 32 |" in card
    assert "Versions: python 3.12." in card and "Code: crepe not recorded" in card
    front = yaml.safe_load(card.split("---")[1])
    assert set(front) == {"library_name", "pipeline_tag", "tags"}  # nothing missing leaks into the metadata
    assert render_model_card(_sparse_record(), {"license": None, "language": None, "tags": None}) == card
    record["metrics"], record["smoke_test"] = {}, None
    assert "No metrics recorded." in render_model_card(record, {})


def test_release_loads_with_transformers_and_holds_the_pruned_weights(release, pruned):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(release)
    expected = dict(pruned[0].model.named_parameters())
    for name, param in model.named_parameters():
        assert torch.equal(param, expected[name]), name


def test_same_inputs_give_byte_identical_releases(pruned, tmp_path):
    lm, config, _, data = pruned
    a = write_release(lm.model, lm.tokenizer, tmp_path / "a", _manifest(lm, config, data), smoke=SMOKE)
    b = write_release(lm.model, lm.tokenizer, tmp_path / "b", _manifest(lm, config, data), smoke=SMOKE)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    assert {f: sha256_file(a / f) for f in files} == {f: sha256_file(b / f) for f in files}


def test_write_release_refuses_a_model_that_does_not_match_its_label(tiny, tmp_path):
    lm = load_model(str(tiny))  # dense
    for sparsity, words in (("2:4", "violates the declared 2:4 pattern"),
                            ("0.5", "measured sparsity 0.0000 is below the declared 0.5")):
        manifest = _manifest(lm, build_config("magnitude", sparsity), {})
        with pytest.raises(ReleaseError, match=words):
            write_release(lm.model, lm.tokenizer, tmp_path / "r", manifest, smoke=None)
        assert not (tmp_path / "r").exists()


def test_write_release_input_errors(pruned, tmp_path):
    lm, config, _, data = pruned
    good = _manifest(lm, config, data)
    with pytest.raises(CrepeError, match="must not set 'files'"):
        write_release(lm.model, lm.tokenizer, tmp_path / "r", {**good, "files": {}}, smoke=None)
    with pytest.raises(CrepeError, match="needs a 'base_model' mapping with spec, content_hash"):
        write_release(lm.model, lm.tokenizer, tmp_path / "r", {"prune": good["prune"]}, smoke=None)
    with pytest.raises(CrepeError, match="unknown model-card field 'titel'; allowed: title, summary"):
        write_release(lm.model, lm.tokenizer, tmp_path / "r", good, {"titel": "x"}, smoke=None)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(CrepeError, match="exists and is not empty; pass overwrite=True"):
        write_release(lm.model, lm.tokenizer, tmp_path / "full", good, smoke=None)
    assert (tmp_path / "full" / "keep.txt").exists()
    write_release(lm.model, lm.tokenizer, tmp_path / "full", good, smoke=None, overwrite=True)
    assert not (tmp_path / "full" / "keep.txt").exists() and (tmp_path / "full" / RELEASE_MANIFEST).exists()


@pytest.mark.parametrize("fail_at", ["card", "tokenizer"])
def test_a_failure_mid_write_leaves_no_half_folder(pruned, tmp_path, monkeypatch, fail_at):
    lm, config, _, data = pruned
    if fail_at == "card":
        monkeypatch.setattr("tasks.release.render_model_card", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    else:
        monkeypatch.setattr(type(lm.tokenizer), "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        write_release(lm.model, lm.tokenizer, tmp_path / "rel", _manifest(lm, config, data), smoke=None)
    assert list(tmp_path.iterdir()) == []  # neither the release nor a temp folder


def test_a_failed_overwrite_keeps_the_previous_release(release, pruned, tmp_path, monkeypatch):
    lm, config, _, data = pruned
    target = tmp_path / "rel"
    shutil.copytree(release, target)
    before = {p.name: sha256_file(p) for p in target.iterdir()}
    monkeypatch.setattr("tasks.release.render_model_card", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        write_release(lm.model, lm.tokenizer, target, _manifest(lm, config, data), smoke=None, overwrite=True)
    assert {p.name: sha256_file(p) for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["rel"]
    verify_release(target, quick_ppl=False)


# --- verifying ------------------------------------------------------------------------------------------


def test_verify_passes_on_a_good_release(release):
    report = verify_release(release)
    manifest = _manifest_of(release)
    assert report["ok"] and report["files_checked"] == len(manifest["files"]) and report["layers_checked"] == 14
    assert report["pattern"] == "2:4" and report["nm_valid"] is True
    assert report["ppl"]["compared"] is True and report["ppl"]["ppl"] == pytest.approx(manifest["smoke_test"]["ppl"])
    assert [layer["name"] for layer in report["layers"]][0] == Q_PROJ
    assert verify_release(release, quick_ppl=False)["ppl"] is None


def test_tampered_file_fails_naming_it(copy):
    config = copy / "config.json"
    config.write_text(config.read_text().replace('"rms_norm_eps"', '"rms_norm_eps" ', 1))
    with pytest.raises(ReleaseError) as info:
        verify_release(copy, quick_ppl=False)
    assert str(info.value).startswith(f"file 'config.json' in {copy} was modified: its sha256 is ")
    assert "but crepe_release.json records" in str(info.value)


def test_missing_file_fails_naming_it(copy):
    (copy / "tokenizer.json").unlink()
    with pytest.raises(ReleaseError, match=r"^file 'tokenizer.json' listed in crepe_release.json is missing from "):
        verify_release(copy, quick_ppl=False)


def test_unlisted_file_fails_naming_it(copy):
    (copy / "notes.txt").write_text("added later")
    with pytest.raises(ReleaseError, match=r"^file 'notes.txt' in .* is not listed in crepe_release.json"):
        verify_release(copy, quick_ppl=False)


def test_several_file_problems_are_counted(copy):
    (copy / "tokenizer.json").unlink()
    (copy / CARD).write_text("edited")
    with pytest.raises(ReleaseError, match=r"missing from .* \(and 1 more problem\)$"):
        verify_release(copy, quick_ppl=False)


def test_changed_weights_fail_the_sparsity_check_even_with_a_matching_hash(copy):
    _edit_weights(copy, lambda t: t[f"{Q_PROJ}.weight"].__setitem__((0, slice(0, 4)), 1.0))
    with pytest.raises(ReleaseError, match=rf"^layer {Q_PROJ} has \d+ zeros of 4096 weights \(sparsity 0\.49\d+\) but "
                                           r"the manifest records 2048 of 4096 \(0\.5000\)$"):
        verify_release(copy, quick_ppl=False)


def test_moved_zeros_fail_the_nm_check(copy):
    def move(tensors):  # same number of zeros, but group 0 of row 0 loses one to group 1
        w = tensors[f"{Q_PROJ}.weight"]
        zero = int((w[0, :4] == 0).nonzero()[0])
        nonzero = 4 + int((w[0, 4:8] != 0).nonzero()[0])
        w[0, zero], w[0, nonzero] = w[0, nonzero].clone(), 0.0

    _edit_weights(copy, move)
    with pytest.raises(ReleaseError, match=rf"^layer {Q_PROJ} violates the 2:4 pattern"):
        verify_release(copy, quick_ppl=False)


def test_manifest_and_model_must_record_the_same_layers(copy):
    _rewrite_manifest(copy, lambda m: m["sparsity"]["layers"].pop())
    with pytest.raises(ReleaseError, match=r"has layer model.layers.1.mlp.down_proj that the manifest does not record"):
        verify_release(copy, quick_ppl=False)
    _rewrite_manifest(copy, lambda m: m["sparsity"]["layers"].append({**m["sparsity"]["layers"][0], "name": "x.y"}))
    with pytest.raises(ReleaseError, match=r"^layer x.y recorded in the manifest does not exist"):
        verify_release(copy, quick_ppl=False)


def test_smoke_perplexity_is_compared_on_the_same_data_only(copy):
    _rewrite_manifest(copy, lambda m: m["smoke_test"].update(ppl=m["smoke_test"]["ppl"] * 1.05))
    with pytest.raises(ReleaseError, match=r"smoke-test perplexity [\d.]+ differs from the recorded [\d.]+ by more "
                                           r"than 1% on the same data and settings \(validation, 2 x 32 tokens\)"):
        verify_release(copy)
    assert verify_release(copy, ppl_rtol=0.1)["ppl"]["compared"] is True
    _rewrite_manifest(copy, lambda m: m["smoke_test"]["data"].update(sha256="0" * 64))
    report = verify_release(copy)
    assert report["ppl"]["compared"] is False and "different evaluation data" in report["ppl"]["reason"]


def test_broken_weights_fail_the_smoke_test(copy):
    def poison(tensors):
        for name, t in tensors.items():
            if name.endswith("norm.weight"):
                t.fill_(float("nan"))

    _edit_weights(copy, poison)
    with pytest.raises(ReleaseError, match=r"smoke-test perplexity is not finite \(inf\)"):
        verify_release(copy)


def test_not_a_release(tmp_path):
    with pytest.raises(ReleaseError, match=r"release folder .*nope does not exist$"):
        verify_release(tmp_path / "nope")
    with pytest.raises(ReleaseError, match=r"has no crepe_release.json \(nor crepe_manifest.json\); it is not a crepe release"):
        verify_release(tmp_path)
    (tmp_path / RELEASE_MANIFEST).write_text("{not json")
    with pytest.raises(ReleaseError, match=r"crepe_release.json is not readable JSON"):
        verify_release(tmp_path)


def test_verify_accepts_a_crepe_prune_folder(tiny, tmp_path, capsys):
    out = tmp_path / "pruned"
    code = main(["--no-progress", "prune", "--model", str(tiny), "--method", "wanda", "--sparsity", "0.5", "--out",
                 str(out), "--calib-source", "pydoc", "--calib-samples", "4", "--seqlen", "32", "--batch-size", "2"])
    assert code == 0
    report = verify_release(out, data_dir=None)
    assert report["manifest"] == "crepe_manifest.json" and report["layers_checked"] == 14
    assert report["overall_sparsity"] == pytest.approx(0.5) and report["pattern"] is None
    assert report["ppl"]["compared"] is False and report["ppl"]["reason"] == "no smoke test recorded in the manifest"


def test_search_reference(tmp_path):
    assert search_reference(None) is None
    path = tmp_path / "pho.json"
    path.write_text(json.dumps({"winner": {"params": {"alpha": 1.0}, "ppl": 3.0}}))
    assert search_reference(path) == {"path": str(path), "sha256": sha256_file(path),
                                      "winner": {"params": {"alpha": 1.0}, "ppl": 3.0}}
    with pytest.raises(CrepeError, match="does not exist"):
        search_reference(tmp_path / "missing.json")


# --- the CLI --------------------------------------------------------------------------------------------------


def test_cli_verify_passes_and_writes_a_report(release, tmp_path, capsys):
    report = tmp_path / "verify.json"
    assert main(["verify", str(release), "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "files match crepe_release.json" in out and "14 pruned layers match, overall sparsity 0.5000" in out
    assert "within 1% of the recorded" in out
    data = json.loads(report.read_text())
    assert data["ok"] is True and len(data["layers"]) == 14
    assert [k for k, v in data.items() if isinstance(v, list)] == ["layers"]  # the one list DVC plots find


def test_cli_verify_failure_is_one_line_and_exit_2(copy, capsys):
    (copy / "extra.bin").write_bytes(b"\0")
    assert main(["verify", str(copy), "--no-ppl"]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"crepe: error: file 'extra.bin' in {copy} is not listed in crepe_release.json " \
                           "(added after the release)\n"


def test_cli_verify_exit_status_in_a_subprocess(copy):
    (copy / CARD).write_text("# edited card\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "verify", str(copy), "--no-ppl"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"crepe: error: file 'README.md' in {copy} was modified: its sha256 is {sha256_file(copy / CARD)[:16]}... "
        f"but crepe_release.json records {_manifest_of(copy)['files'][CARD]['sha256'][:16]}..."]
