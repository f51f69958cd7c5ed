"""Calibration sampling (spec §1.2) and evaluation text: protocol, determinism, sources, errors."""

from __future__ import annotations

import json
import random

import pytest

from crepe import data
from crepe.errors import CrepeError


class CharTokenizer:
    """One token per character: makes window arithmetic checkable by hand."""

    def __call__(self, text, verbose=False, return_tensors=None):
        ids = [ord(c) % 1000 for c in text]
        if return_tensors == "pt":
            import torch

            return {"input_ids": torch.tensor([ids])}
        return {"input_ids": ids}


def reference_sampling(docs, n_samples, seqlen, seed):
    """The official Wanda/SparseGPT loop, written with the global RNG as they do."""
    random.seed(seed)
    tok = CharTokenizer()
    out = []
    for _ in range(n_samples):
        while True:
            i = random.randint(0, len(docs) - 1)
            ids = tok(docs[i])["input_ids"]
            if len(ids) > seqlen:
                break
        j = random.randint(0, len(ids) - seqlen - 1)
        out.append(ids[j : j + seqlen])
    return out


DOCS = ["short", "x" * 3, "abcdefghijklmnopqrstuvwxyz" * 3, "0123456789" * 2, "tiny", "The quick brown fox " * 4]


def test_sample_calibration_matches_official_loop():
    got = data.sample_calibration(CharTokenizer(), DOCS, n_samples=7, seqlen=12, seed=3)
    assert got.shape == (7, 12)
    assert got.tolist() == reference_sampling(DOCS, 7, 12, 3)


def test_sample_calibration_seeded_and_strictly_longer_docs():
    a = data.sample_calibration(CharTokenizer(), DOCS, 5, 20, seed=0)
    b = data.sample_calibration(CharTokenizer(), DOCS, 5, 20, seed=0)
    c = data.sample_calibration(CharTokenizer(), DOCS, 5, 20, seed=1)
    assert a.equal(b) and not a.equal(c)
    # seqlen 20 == len("0123456789" * 2): that document must never be chosen (strictly longer).
    digits = {ord(ch) for ch in "0123456789"}
    assert not any(set(row) <= digits for row in a.tolist())


def test_sample_calibration_no_document_long_enough():
    with pytest.raises(CrepeError, match="no calibration document has more than seqlen=500"):
        data.sample_calibration(CharTokenizer(), DOCS, 2, 500, seed=0)


def _fake_data_dir(tmp_path, c4_docs, wiki_rows):
    (tmp_path / "c4").mkdir()
    (tmp_path / "wikitext2_raw").mkdir()
    (tmp_path / data.C4_FILE).write_text("".join(json.dumps({"text": d}) + "\n" for d in c4_docs))
    for split in ("test", "validation"):
        (tmp_path / data.WIKITEXT_FILES[split]).write_text(
            "".join(json.dumps({"text": r}) + "\n" for r in wiki_rows)
        )
    return tmp_path


def test_local_sources_and_join(tmp_path):
    root = _fake_data_dir(tmp_path, ["doc one " * 20, "doc two " * 20], ["", " = T = \n", "", " body \n"])
    docs, info = data.load_calibration_docs("auto", root)
    assert info.source == "c4-local" and info.n_docs == 2 and len(info.sha256) == 64
    text, einfo = data.load_eval_text("validation", "auto", root)
    assert text == "\n\n = T = \n\n\n\n\n body \n"  # "" + sep + row + sep + "" + sep + row
    assert einfo.source == "wikitext2-local" and einfo.split == "validation"


def test_empty_corpus_is_refused(tmp_path):
    root = _fake_data_dir(tmp_path, ["   "], [""])
    with pytest.raises(CrepeError, match="is empty"):
        data.load_calibration_docs("auto", root)
    with pytest.raises(CrepeError, match="is empty"):
        data.load_eval_text("test", "auto", root)


def test_missing_data_dir_is_refused(tmp_path, monkeypatch):
    with pytest.raises(CrepeError, match="does not exist"):
        data.resolve_data_dir(tmp_path / "missing")
    monkeypatch.setenv("CREPE_DATA_DIR", str(tmp_path / "also-missing"))
    with pytest.raises(CrepeError, match="CREPE_DATA_DIR"):
        data.resolve_data_dir(None)


def test_env_data_dir_is_used(tmp_path, monkeypatch):
    root = _fake_data_dir(tmp_path, ["abc " * 50], ["x"])
    monkeypatch.setenv("CREPE_DATA_DIR", str(root))
    assert data.resolve_data_dir() == root.resolve()
    assert data.load_calibration_docs()[1].path == str(root.resolve() / data.C4_FILE)


def test_pydoc_fallback_parts_are_disjoint_and_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    empty = tmp_path / "empty"
    empty.mkdir()
    docs, info = data.load_calibration_docs("auto", empty)
    assert info.source == "pydoc" and info.split == "calibration"
    val, _ = data.load_eval_text("validation", "pydoc")
    test, _ = data.load_eval_text("test", "pydoc")
    assert not set(docs) & set(val.split("\n\n")) and len(test) > len(val) > 0


def test_unknown_sources_and_splits():
    with pytest.raises(CrepeError, match="unknown split 'train'"):
        data.load_eval_text("train")
    with pytest.raises(CrepeError, match="unknown calibration source"):
        data.load_calibration_docs("pile")


def test_shared_wikitext_matches_its_published_hash():
    root = data.resolve_data_dir()
    if root is None or not (root / data.WIKITEXT_FILES["test"]).is_file():
        pytest.skip("../shared/data is not present")
    _, info = data.load_eval_text("test", "wikitext2-local", root)
    assert info.sha256 == "a26bd387e6f1d19e45ddbd7fe6fd5aef3f97f457863f0973e3327e68ac6daee8"
    assert info.n_docs == 4358
