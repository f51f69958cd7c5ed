"""Every CUDA path (issue 11): whole-model and block-at-a-time pruning, half precision, perplexity,
SparseGPT's Hessian, the CLI and the Dask GPU spread. Run them on a CUDA machine with ``pytest -m gpu``.

Every test here carries the ``gpu`` marker (tests/conftest.py refuses an unmarked one and skips them
all without CUDA; tests/test_gpu_spread.py checks both). What "equal to the CPU" means:

- **Same scores, same masks.** Mask selection is exact and breaks ties by position, so masks selected on
  the GPU from given scores equal those selected on the CPU from the same scores, bit for bit.
- **float32 CPU vs GPU.** Magnitude scores are ``|W|`` (exact on both), so its masks are identical. Activation-
  aware scores depend on sums and matmuls whose float32 rounding differs between CPU and GPU kernels
  (~1e-7 relative; TF32 is switched off here). Such scores are compared with ``rtol=1e-4``, and a mask may
  differ only inside a group (an N:M group, a row or the layer) whose CPU scores are a near-tie at the
  cut (gap <= 1e-3 relative). Once a block's masks differ, the next block's inputs differ by more than
  rounding, so later blocks are only checked for exact counts and GPU self-consistency.
- **Offload vs whole-model GPU.** The same kernels on the same inputs: bit-identical weights.
- Perplexity: CPU vs GPU within 1e-4 relative; block-at-a-time vs whole-model GPU within 1e-6.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tiny_models import build
from torch import nn

import crepe.pruner
from crepe.blocks import find_blocks
from crepe.evaluate import perplexity, same_device
from crepe.masks import nm_groups_valid, select_mask
from crepe.pruner import PruneConfig, PruneReport, expected_pruned, prune_model
from crepe.sparsegpt import HessianAccumulator, gram
from crepe.types import parse_sparsity
from crepe.weights import PrunableWeight, prunable_weights
from tests.test_cli import run as cli  # the CLI runner: exit code, stdout, stderr

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (gpu marker)"),
]

CUDA = torch.device("cuda")
SCORERS = ("magnitude", "wanda", "ria", "crepe")
SPARSITIES = ("2:4", "0.5")
SCORE_RTOL = 1e-4  # float32 CPU vs GPU scores of the same block inputs
TIE_RTOL = 1e-3  # a mask may differ only where the CPU cut is a near-tie within this relative gap
HERMETIC = ["--calib-source", "pydoc", "--eval-source", "pydoc", "--calib-samples", "4", "--seqlen", "32",
            "--max-windows", "2", "--batch-size", "2"]


@pytest.fixture(autouse=True)
def _fp32_matmuls() -> Iterator[None]:
    """float32 matmuls and convolutions in full float32 (no TF32), whatever the process had set."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def cfg(method: str, sparsity: str) -> PruneConfig:
    return PruneConfig(method, parse_sparsity(sparsity))


def linears(model: nn.Module) -> dict[str, PrunableWeight]:
    """The pruned weight matrices in the pruner's order (block by block); ``.weight`` is the (out, in) view."""
    path, blocks = find_blocks(model)
    return {f"{path}.{i}.{n}": w for i, b in enumerate(blocks) for n, w in prunable_weights(b).items()}


def keep_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: (m.weight.detach() != 0).cpu() for name, m in linears(model).items()}


def devices_of(model: nn.Module) -> set[str]:
    return {p.device.type for p in model.parameters()} | {b.device.type for b in model.buffers()}


def spy_scores(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """Record (on the CPU) every score matrix the pruner computes, in pruning order."""
    seen: list[torch.Tensor] = []
    real = crepe.pruner.score

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(out.detach().to("cpu", copy=True))
        return out

    monkeypatch.setattr(crepe.pruner, "score", spy)
    return seen


def prune_on(arch: str, config: PruneConfig, calib: torch.Tensor, place: str,
             dtype: torch.dtype = torch.float32) -> tuple[nn.Module, PruneReport]:
    """A fresh seeded ``arch`` model pruned with weights and compute on the CPU (``cpu``), both on the GPU
    (``cuda``), or weights on the CPU and one block at a time on the GPU (``offload``)."""
    model = build(arch, seed=0).to(dtype)
    if place == "cuda":
        model.to(CUDA)
    report = prune_model(model, calib, config, device=None if place == "cpu" else CUDA, batch_size=3)
    return model, report


def groups(t: torch.Tensor, config: PruneConfig) -> torch.Tensor:
    """``t`` (out, in) as rows of the comparison groups the mask is selected in."""
    pattern = config.sparsity.pattern
    if pattern is not None:
        return t.reshape(-1, pattern.m)
    return t if config.resolved_group() == "row" else t.reshape(1, -1)


def reselect(scores: torch.Tensor, config: PruneConfig) -> torch.Tensor:
    """The keep-mask of ``scores`` selected on the CPU."""
    if config.sparsity.pattern is not None:
        return select_mask(scores, pattern=config.sparsity.pattern)
    return select_mask(scores, config.sparsity.sparsity, group=config.resolved_group(), rule=config.rule)


def assert_near_ties_only(name: str, scores: torch.Tensor, keep_cpu: torch.Tensor, keep_gpu: torch.Tensor,
                          config: PruneConfig) -> None:
    s, kc, kg = groups(scores, config), groups(keep_cpu, config), groups(keep_gpu, config)
    for row in torch.nonzero((kc != kg).any(dim=1)).flatten().tolist():
        hi = float(s[row][kc[row]].min())  # the weakest weight the CPU kept
        lo = float(s[row][~kc[row]].max())  # the strongest weight it pruned
        assert hi - lo <= TIE_RTOL * abs(hi), (
            f"{name}: group {row} has a different mask on the GPU although the CPU cut is not a near-tie "
            f"(kept >= {hi:.6g}, pruned <= {lo:.6g})")


def compare_with_cpu(arch: str, config: PruneConfig, calib: torch.Tensor, place: str,
                     monkeypatch: pytest.MonkeyPatch) -> tuple[nn.Module, nn.Module]:
    """Prune on the CPU and on ``place``; check the masks as the module docstring says."""
    cpu_scores = spy_scores(monkeypatch)
    cpu_model, cpu_report = prune_on(arch, config, calib, "cpu")
    monkeypatch.undo()
    gpu_scores = spy_scores(monkeypatch)
    gpu_model, gpu_report = prune_on(arch, config, calib, place)
    monkeypatch.undo()
    names = list(linears(cpu_model))
    assert len(cpu_scores) == len(gpu_scores) == len(names)
    assert gpu_report.mask_pruned == cpu_report.mask_pruned  # exact counts on both
    assert gpu_report.nm_valid == cpu_report.nm_valid
    keep_cpu, keep_gpu = keep_masks(cpu_model), keep_masks(gpu_model)
    path, _ = find_blocks(cpu_model)
    upstream_equal = True  # every earlier block pruned identically, so this block's inputs differ by rounding only
    block = None
    block_equal = True
    for name, sc, sg in zip(names, cpu_scores, gpu_scores):
        this_block = name.removeprefix(path + ".").split(".")[0]
        if this_block != block:
            upstream_equal = upstream_equal and block_equal
            block, block_equal = this_block, True
        assert torch.equal(keep_gpu[name], reselect(sg, config)), f"{name}: GPU mask is not its scores' mask"
        if config.method == "magnitude":
            assert torch.equal(sg, sc) and torch.equal(keep_gpu[name], keep_cpu[name]), name
        elif upstream_equal:
            torch.testing.assert_close(sg, sc, rtol=SCORE_RTOL, atol=SCORE_RTOL * float(sc.abs().max()))
            assert_near_ties_only(name, sc, keep_cpu[name], keep_gpu[name], config)
        block_equal = block_equal and torch.equal(keep_gpu[name], keep_cpu[name])
    return cpu_model, gpu_model


# --- (a) whole model on the GPU, (b) one block at a time ---------------------------------------------------------


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("method", SCORERS)
def test_whole_model_on_gpu_prunes_like_the_cpu(arch: str, method: str, sparsity: str, calib_ids: torch.Tensor,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    _, gpu_model = compare_with_cpu(arch, cfg(method, sparsity), calib_ids, "cuda", monkeypatch)
    assert devices_of(gpu_model) == {"cuda"}


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("method", SCORERS)
def test_offloaded_model_prunes_like_the_cpu_and_the_whole_gpu(arch: str, method: str, sparsity: str,
                                                               calib_ids: torch.Tensor,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    config = cfg(method, sparsity)
    _, offloaded = compare_with_cpu(arch, config, calib_ids, "offload", monkeypatch)
    assert devices_of(offloaded) == {"cpu"}  # every block went back after its turn on the GPU
    whole, _ = prune_on(arch, config, calib_ids, "cuda")
    for name, m in linears(whole).items():  # same kernels, same inputs: bit-identical weights
        assert torch.equal(m.weight.cpu(), linears(offloaded)[name].weight), name


def test_masks_from_identical_scores_are_identical_on_gpu() -> None:
    """Selection alone: random scores with deliberate ties give the same masks on both devices."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (64, 128), generator=g).float()  # many exact ties: position decides
    scores[3] = 1.0  # a whole row of ties
    for config in (cfg("ria", "2:4"), cfg("ria", "4:8"), cfg("ria", "0.5"), cfg("wanda", "0.5"), cfg("ria", "0.7")):
        assert torch.equal(reselect(scores.to(CUDA), config).cpu(), reselect(scores, config)), config
    thr = PruneConfig("ria", parse_sparsity("0.5"), rule="threshold")
    assert torch.equal(reselect(scores.to(CUDA), thr).cpu(), reselect(scores, thr))


def test_load_model_places_whole_or_offloaded(tmp_path: Path, calib_ids: torch.Tensor) -> None:
    """``load_model``: a small model moves to the GPU whole; ``offload=True`` keeps it on the CPU and the
    prune and the perplexity visit the GPU block by block, with the same result as the whole model."""
    from crepe.models import load_model
    from tests.local_models import save_tiny_llama

    folder = save_tiny_llama(tmp_path / "tiny")
    whole = load_model(str(folder), device="cuda")
    assert not whole.info.offload and whole.info.device.startswith("cuda") and devices_of(whole.model) == {"cuda"}
    off = load_model(str(folder), device="cuda", offload=True)
    assert off.info.offload and devices_of(off.model) == {"cpu"}
    config = cfg("crepe", "2:4")
    ids = calib_ids % len(whole.tokenizer)
    rw = prune_model(whole.model, ids, config, device=whole.info.device)
    ro = prune_model(off.model, ids, config, device=off.info.device)
    assert rw.mask_pruned == ro.mask_pruned and ro.nm_valid
    assert devices_of(off.model) == {"cpu"}
    for name, m in linears(whole.model).items():
        assert torch.equal(m.weight.cpu(), linears(off.model)[name].weight), name
    stream = torch.randint(0, len(whole.tokenizer), (1, 5 * 16 + 3), generator=torch.Generator().manual_seed(1))
    pw = perplexity(whole.model, stream, seqlen=16, device=whole.info.device, blockwise=whole.info.offload)
    po = perplexity(off.model, stream, seqlen=16, device=off.info.device, blockwise=off.info.offload)
    assert math.isfinite(pw.ppl) and po.ppl == pytest.approx(pw.ppl, rel=1e-6)
    assert devices_of(off.model) == {"cpu"}


# --- (c) half precision on the GPU -------------------------------------------------------------------------------


@pytest.mark.parametrize("place", ["cuda", "offload"])
@pytest.mark.parametrize("sparsity", ["2:4", "4:8", "0.5"])
@pytest.mark.parametrize("method", [*SCORERS, "sparsegpt"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("arch_name", ["llama", "gemma3"])
def test_half_precision_prune_on_gpu(arch_name: str, dtype: torch.dtype, method: str, sparsity: str, place: str,
                                     calib_ids: torch.Tensor, eval_ids: torch.Tensor) -> None:
    config = cfg(method, sparsity)
    model, report = prune_on(arch_name, config, calib_ids, place, dtype)
    home = "cuda" if place == "cuda" else "cpu"
    assert devices_of(model) == {home}
    pattern = config.sparsity.pattern
    for name, m in linears(model).items():
        assert m.weight.dtype == dtype and torch.isfinite(m.weight).all(), name
        want = expected_pruned(tuple(m.weight.shape), config)
        assert report.mask_pruned[name] == want, name  # exactly the requested count
        zeros = int((m.weight == 0).sum())
        assert zeros >= want, name  # (an fp16 weight may also have rounded to zero on its own)
        if pattern is not None:
            assert nm_groups_valid(m.weight.float(), pattern), name
    assert report.nm_valid is (True if pattern is not None else None)
    assert report.sparsity == pytest.approx(config.sparsity.sparsity, abs=2e-3)
    if place == "cuda":
        with torch.no_grad():
            logits = model(input_ids=eval_ids.to(CUDA), use_cache=False).logits
        assert torch.isfinite(logits).all()
    ppl = perplexity(model, eval_ids, seqlen=16, batch_size=2, device=CUDA)
    assert math.isfinite(ppl.ppl) and ppl.ppl > 1


# --- (d) perplexity ------------------------------------------------------------------------------------------------


def test_perplexity_on_gpu_equals_cpu_whole_and_blockwise(arch: str, eval_ids: torch.Tensor) -> None:
    cpu = perplexity(build(arch, seed=0), eval_ids, seqlen=16, batch_size=2)
    on_gpu = build(arch, seed=0).to(CUDA)
    whole = perplexity(on_gpu, eval_ids, seqlen=16, batch_size=2)  # the weights' device: the GPU
    offloaded = build(arch, seed=0)
    blockwise = perplexity(offloaded, eval_ids, seqlen=16, batch_size=2, device=CUDA)  # blockwise by default
    forced = perplexity(on_gpu, eval_ids, seqlen=16, batch_size=2, device=CUDA, blockwise=True)
    assert devices_of(offloaded) == {"cpu"} and devices_of(on_gpu) == {"cuda"}
    assert whole.n_windows == blockwise.n_windows == cpu.n_windows == 5
    assert whole.ppl == pytest.approx(cpu.ppl, rel=1e-4)
    assert blockwise.ppl == pytest.approx(whole.ppl, rel=1e-6)
    assert forced.ppl == pytest.approx(whole.ppl, rel=1e-6)


def test_perplexity_device_cuda_names_the_weights_device(monkeypatch: pytest.MonkeyPatch,
                                                         eval_ids: torch.Tensor) -> None:
    """``device="cuda"`` with the weights on ``cuda:<current>`` is the same device: the whole-model path, not
    block by block (``torch.device("cuda") != torch.device("cuda:0")``, hence ``same_device``)."""
    import crepe.evaluate

    current = torch.device("cuda", torch.cuda.current_device())
    assert same_device(torch.device("cuda"), current) and same_device(current, torch.device("cuda"))
    assert not same_device(torch.device("cuda"), torch.device("cpu"))
    model = build("llama", seed=0).to(current)

    def no_blockwise(*_args, **_kwargs):
        raise AssertionError("a model already on the device was evaluated block by block")

    monkeypatch.setattr(crepe.evaluate, "_blockwise_logits", no_blockwise)
    for device in ("cuda", current, None):
        assert math.isfinite(perplexity(model, eval_ids, seqlen=16, device=device).ppl)


def test_perplexity_of_a_gpu_pruned_model_equals_cpu(calib_ids: torch.Tensor, eval_ids: torch.Tensor) -> None:
    config = cfg("magnitude", "2:4")  # identical masks on both devices (see the module docstring)
    cpu_model, _ = prune_on("llama", config, calib_ids, "cpu")
    gpu_model, _ = prune_on("llama", config, calib_ids, "cuda")
    cpu = perplexity(cpu_model, eval_ids, seqlen=16)
    gpu = perplexity(gpu_model, eval_ids, seqlen=16)
    assert gpu.ppl == pytest.approx(cpu.ppl, rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_perplexity_on_gpu(dtype: torch.dtype, eval_ids: torch.Tensor) -> None:
    ref = perplexity(build("llama", seed=0), eval_ids, seqlen=16)
    whole = perplexity(build("llama", seed=0).to(dtype).to(CUDA), eval_ids, seqlen=16)
    blockwise = perplexity(build("llama", seed=0).to(dtype), eval_ids, seqlen=16, device=CUDA)
    assert math.isfinite(whole.ppl) and whole.ppl == pytest.approx(ref.ppl, rel=2e-2)
    assert blockwise.ppl == pytest.approx(whole.ppl, rel=1e-3)


# --- (e) SparseGPT -------------------------------------------------------------------------------------------------


def test_hessian_accumulated_on_gpu_equals_cpu() -> None:
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(3, 16, 64, generator=g) for _ in range(4)]
    cpu, gpu, shared = (HessianAccumulator(64, torch.device("cpu")), HessianAccumulator(64, CUDA),
                        HessianAccumulator(64, CUDA))
    for x in chunks:
        cpu.add(x)
        gpu.add(x.to(CUDA))
        xg = x.to(CUDA)
        shared.add(xg, gram(xg))  # the pruner's path: one X^T X shared by q/k/v
    assert gpu.xtx.device.type == "cuda" and gpu.n_seq == cpu.n_seq == 12
    h = cpu.hessian()
    tol = {"rtol": 1e-5, "atol": 1e-5 * float(h.abs().max())}
    torch.testing.assert_close(gpu.hessian().cpu(), h, **tol)
    torch.testing.assert_close(shared.hessian().cpu(), h, **tol)


@pytest.mark.parametrize("sparsity", ["2:4", "0.5"])
def test_sparsegpt_on_gpu_accumulates_on_device_and_matches_cpu(sparsity: str, calib_ids: torch.Tensor,
                                                                eval_ids: torch.Tensor,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The Hessians reach SparseGPT on the GPU, equal the CPU ones for block 0 (dense inputs: rounding only),
    and the reconstructed model is as good as the CPU one."""
    def record(into: list):
        real = crepe.pruner.sparsegpt_prune

        def spy(weight, hessian, *args, **kwargs):
            into.append(hessian.detach())
            return real(weight, hessian, *args, **kwargs)

        return spy

    config = cfg("sparsegpt", sparsity)
    results = {}
    for place in ("cpu", "cuda", "offload"):
        seen: list[torch.Tensor] = []
        monkeypatch.setattr(crepe.pruner, "sparsegpt_prune", record(seen))
        model, report = prune_on("llama", config, calib_ids, place)
        monkeypatch.undo()
        results[place] = (model, report, seen)
    cpu_model, cpu_report, cpu_h = results["cpu"]
    n_block0 = len(prunable_weights(find_blocks(cpu_model)[1][0]))
    for place in ("cuda", "offload"):
        model, report, hs = results[place]
        assert all(h.device.type == "cuda" for h in hs) and len(hs) == len(cpu_h)
        for hg, hc in zip(hs[:n_block0], cpu_h[:n_block0]):
            torch.testing.assert_close(hg.cpu(), hc, rtol=1e-4, atol=1e-5 * float(hc.abs().max()))
        assert report.mask_pruned == cpu_report.mask_pruned and report.nm_valid == cpu_report.nm_valid
        assert all(torch.isfinite(m.weight).all() for m in linears(model).values())
        agree = [float((a == b).float().mean()) for a, b in zip(keep_masks(model).values(),
                                                                  keep_masks(cpu_model).values())]
        assert min(agree) >= 0.95, agree  # SparseGPT's sequential choices may flip at near-ties only
    whole_model = results["cuda"][0]
    for name, m in linears(whole_model).items():  # offload vs whole GPU: same kernels, same result
        assert torch.equal(m.weight.cpu(), linears(results["offload"][0])[name].weight), name
    cpu_ppl = perplexity(cpu_model, eval_ids, seqlen=16).ppl
    gpu_ppl = perplexity(whole_model, eval_ids, seqlen=16).ppl
    assert gpu_ppl == pytest.approx(cpu_ppl, rel=1e-2)


# --- the CLI ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.local_models import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("gpu-cli") / "tiny")


@pytest.mark.parametrize("method", ["wanda", "crepe", "sparsegpt"])
def test_cli_prune_device_cuda(tiny_folder: Path, method: str, tmp_path: Path,
                               capsys: pytest.CaptureFixture) -> None:
    runs = {}
    for device in ("cuda", "cpu"):
        out = tmp_path / device
        code, _, err = cli(["prune", "--model", str(tiny_folder), "--method", method, "--sparsity", "2:4",
                            "--device", device, "--out", str(out), "--eval-split", "validation", *HERMETIC], capsys)
        assert code == 0, err
        runs[device] = (out, json.loads((out / "crepe_manifest.json").read_text()))
    out, manifest = runs["cuda"]
    assert manifest["model"]["device"].startswith("cuda") and manifest["model"]["offload"] is False
    assert manifest["prune"]["nm_valid"] is True
    assert manifest["evaluation"]["ppl"] == pytest.approx(runs["cpu"][1]["evaluation"]["ppl"], rel=2e-2)
    assert [layer["zeros"] for layer in manifest["prune"]["layers"]] == \
        [layer["zeros"] for layer in runs["cpu"][1]["prune"]["layers"]]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)  # saved from GPU tensors, loads on the CPU
    assert devices_of(model) == {"cpu"}


def test_cli_eval_device_cuda_and_a_missing_gpu(tiny_folder: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    code, stdout, err = cli(["eval", "--model", str(tiny_folder), "--device", "cuda", "--json",
                             str(tmp_path / "ppl.json"), *HERMETIC], capsys)
    assert code == 0, err
    assert "perplexity" in stdout
    missing = f"cuda:{torch.cuda.device_count()}"
    code, _, err = cli(["eval", "--model", str(tiny_folder), "--device", missing, *HERMETIC], capsys)
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("crepe: error:")]
    assert code == 2 and len(lines) == 1 and missing in lines[0] and "Traceback" not in err


# --- Dask: one candidate per GPU ---------------------------------------------------------------------------------


def run_dask_gpu_pipeline(tmp_path: Path, model_folder: Path, visible: list[str]) -> dict[str, str]:
    """``crepe pipeline`` with ``runner.backend: dask`` and ``model.device: cuda``; checks that the candidates ran
    in Dask workers pinned one per GPU of ``visible``, each holding its GPU's concurrency slot, never two at
    once on one GPU. Returns worker pid -> GPU id. (tests/test_gpu_spread.py runs it with two fake GPUs.)"""
    from tests.test_pipeline import crepe_cli, make_project

    proj = make_project(tmp_path / "p", model_folder, runner=", backend: dask")
    log = tmp_path / "computed.txt"
    (tmp_path / "prefect-home").mkdir()
    res = crepe_cli(proj, tmp_path / "prefect-home", "pipeline", "-S", "model.device=cuda",
                    "-S", "runner.max_workers=2", log=log, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line.split("\t") for line in log.read_text().splitlines()]
    flow_pid = next(r[1] for r in rows if r[0] == "pho-screen" and len(r) == 2)
    gpu_of_pid: dict[str, str] = {}
    for r in rows:
        if r[0] == "verify-candidate-gpu":
            assert gpu_of_pid.setdefault(r[1], r[2]) == r[2], "a worker used two GPUs"
    starts = [r[1] for r in rows if r[0] == "verify-candidate" and len(r) == 2]
    assert len(starts) == 3 and set(starts) == set(gpu_of_pid)  # top_k 2 + the RIA point, each on a GPU
    assert flow_pid not in gpu_of_pid and len(gpu_of_pid) <= len(visible)
    assert set(gpu_of_pid.values()) <= set(visible)
    assert len(set(gpu_of_pid.values())) == len(gpu_of_pid)  # one worker per GPU
    spans: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r[0] == "verify-candidate" and len(r) == 4:
            end = float(r[3])
            spans.setdefault(gpu_of_pid[r[1]], []).append((end - float(r[2]), end))
    for gpu, intervals in spans.items():
        intervals.sort()
        assert all(a[1] <= b[0] + 1e-3 for a, b in zip(intervals, intervals[1:])), (gpu, intervals)
    assert (proj / "data" / "release" / "crepe_release.json").is_file()
    return gpu_of_pid


def test_dask_pipeline_spreads_candidates_over_gpus(tmp_path: Path, tiny_folder: Path) -> None:
    from tasks.gpus import visible_gpus

    visible = visible_gpus()
    used = run_dask_gpu_pipeline(tmp_path, tiny_folder, visible)
    # 3 candidates on min(n_gpus, 3) idle single-threaded workers: Dask hands each worker one
    assert len(set(used.values())) == min(len(visible), 3), used
