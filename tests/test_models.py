"""Model sources: spec parsing, clear errors for bad specs and corrupt files, local folder loading."""

from __future__ import annotations

import shutil

import pytest
import torch

from crepe.errors import CrepeError
from crepe.models import (
    EMBEDDED,
    check_gguf,
    check_model_folder,
    load_model,
    parse_dtype,
    resolve_device,
    resolve_source,
)
from tests.local_models import save_tiny_llama


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


def test_resolve_source_unknown_spec_lists_forms():
    with pytest.raises(CrepeError, match="accepted forms: embedded:smollm2-135m"):
        resolve_source("not a model spec!")


def test_resolve_source_unknown_embedded_name_lists_available():
    with pytest.raises(CrepeError, match="available: gemma3-270m, smollm2-135m"):
        resolve_source("embedded:llama-70b")


def test_resolve_source_missing_folder(tmp_path):
    with pytest.raises(CrepeError, match="does not exist"):
        resolve_source(str(tmp_path / "nope"))


def test_resolve_source_hub_id_is_looked_up_in_the_hf_cache(tmp_path, monkeypatch):
    # recognised as a hub id (not a bad spec): offline and not cached, it names the cache folder
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    for spec in ("hf:org/some-model@main", "meta-llama/Llama-2-7b-hf"):
        repo = spec.removeprefix("hf:").split("@")[0]
        with pytest.raises(CrepeError, match=f"hub model {repo} is not in the HF cache .*HF_HUB_OFFLINE=1"):
            resolve_source(spec)


def test_check_model_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(CrepeError, match="no config.json"):
        check_model_folder(tmp_path)


def test_check_model_folder_truncated_safetensors(tiny_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CrepeError, match="truncated|corrupt"):
        check_model_folder(broken)


def test_check_model_folder_garbage_safetensors(tiny_dir, tmp_path):
    broken = tmp_path / "garbage"
    shutil.copytree(tiny_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CrepeError, match="corrupt|truncated"):
        check_model_folder(broken)


def test_check_gguf_bad_magic_and_wrong_hash(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + b"\x00" * 100)
    with pytest.raises(CrepeError, match="not a GGUF file"):
        check_gguf(bad)
    truncated = tmp_path / "trunc.gguf"
    truncated.write_bytes(b"GGUF" + b"\x00" * 100)
    with pytest.raises(CrepeError, match="corrupt or truncated"):
        check_gguf(truncated, EMBEDDED["smollm2-135m"].sha256)


def test_parse_dtype_and_device_errors():
    assert parse_dtype("bf16") is torch.bfloat16
    with pytest.raises(CrepeError, match="unknown dtype 'int8'"):
        parse_dtype("int8")
    with pytest.raises(CrepeError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(CrepeError, match="CUDA is not available"):
            resolve_device("cuda")
        assert resolve_device("auto").type == "cpu"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_load_model_local_folder(tiny_dir, dtype):
    lm = load_model(str(tiny_dir), dtype=dtype, device="cpu")
    assert lm.info.kind == "local"
    assert lm.info.dtype == dtype
    assert len(lm.info.content_hash) == 64
    assert next(lm.model.parameters()).dtype == parse_dtype(dtype)
    assert lm.model.config.use_cache is False
    again = load_model(str(tiny_dir), dtype=dtype, device="cpu")
    assert again.info.content_hash == lm.info.content_hash


def test_folder_hash_memo_reuses_and_detects_changes(tmp_path, monkeypatch):
    from crepe import io

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"one")
    (folder / "crepe_manifest.json").write_text("{}")
    memo = tmp_path / "memo.json"
    first = io.sha256_folder(folder, exclude=("crepe_manifest.json",), memo=memo)
    assert memo.is_file() and first == io.sha256_folder(folder, exclude=("crepe_manifest.json",))
    calls = []
    monkeypatch.setattr(io, "sha256_file", lambda p: calls.append(p) or "x")
    assert io.sha256_folder(folder, exclude=("crepe_manifest.json",), memo=memo) == first
    assert calls == [], "an unchanged file must not be read again"
    monkeypatch.undo()
    (folder / "a.bin").write_bytes(b"two!")
    assert io.sha256_folder(folder, exclude=("crepe_manifest.json",), memo=memo) != first
    (folder / "crepe_manifest.json").write_text('{"changed": true}')
    memo.write_text("not json")
    assert io.sha256_folder(folder, exclude=("crepe_manifest.json",), memo=memo) == io.sha256_folder(
        folder, exclude=("crepe_manifest.json",)
    )
