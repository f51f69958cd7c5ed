"""Models larger than ``--max-memory``: streamed block by block from the shards (crepe/streaming.py).

Each test runs the real path: a LLaMA saved by ``save_pretrained`` in several shards, loaded under a
cap below its size, pruned / evaluated / verified, and compared with the in-memory run of the same
configuration bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import front_door
import pytest
import torch
from local_models import word_tokenizer
from safetensors.torch import load_file
from tiny_models import ARCHS, build
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from crepe.errors import CrepeError
from crepe.models import load_model
from crepe.shards import Checkpoint, parse_size
from crepe.streaming import StreamedModel, load_capped
from flows.cli import main
from tasks.verify import verify_release

ROOT = Path(__file__).resolve().parents[1]
CAP = "380KB"  # below the 3-block model's 550-650 KB of weights, above its tensors outside the blocks plus one block
BUDGET = ("calibration.samples=4", "calibration.seqlen=32", "eval.ppl.seqlen=32", "eval.ppl.max_windows=5",
          "eval.ppl.batch_size=2", "data.calib_source=pydoc", "data.eval_source=pydoc")


def prune(model: Path, method: str, sparsity: str, out: Path, *overrides: str, max_memory: str | int | None = None,
          dtype: str = "float32", eval_split: str | None = None) -> dict:
    """``crepe prune`` of ``model`` within BUDGET (under ``max_memory`` when given): the manifest."""
    cfg = front_door.config(model, method, sparsity, *overrides, budget=BUDGET, max_memory=max_memory, dtype=dtype)
    return front_door.prune(cfg, out, eval_split=eval_split)


def save_llama(path: Path, hidden: int = 64, layers: int = 3, intermediate: int = 128, tie: bool = True,
               shard: str = "100KB", nan_layer: str | None = None) -> Path:
    """A seeded LLaMA with a word tokenizer saved in several safetensors shards."""
    tokenizer = word_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=tie)
    model = LlamaForCausalLM(config).eval()
    if nan_layer:
        model.get_submodule(nan_layer).weight.data[0, 0] = float("nan")
    model.save_pretrained(path, max_shard_size=shard)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def sharded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_llama(tmp_path_factory.mktemp("sharded") / "model", tie=request.param)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def test_parse_size() -> None:
    assert parse_size("3GB") == 3 * 10**9
    assert parse_size("512MiB") == parse_size("512M") == 512 * 2**20
    assert parse_size("1.5 gb") == 1_500_000_000
    assert parse_size(4096) == 4096
    for bad in ("lots", "3 parsecs", "-1GB", "0"):
        with pytest.raises(CrepeError):
            parse_size(bad)


def test_sharded_fixture_is_sharded_and_over_the_cap(sharded: Path) -> None:
    assert len(list(sharded.glob("*.safetensors"))) >= 3 and (sharded / "model.safetensors.index.json").is_file()
    assert Checkpoint(sharded).nbytes(torch.float32) > parse_size(CAP)


def test_streamed_model_matches_from_pretrained(sharded: Path) -> None:
    """Outside the blocks: the same tensors, tied head and recomputed rotary buffers as from_pretrained."""
    lm = load_capped(str(sharded), max_memory=CAP)
    ref = load_model(str(sharded))
    assert isinstance(lm, StreamedModel) and lm.info.extra["streamed"]["max_memory"] == parse_size(CAP)
    assert lm.model.config._attn_implementation == ref.model.config._attn_implementation
    for name, buffer in ref.model.named_buffers():
        assert torch.equal(lm.model.get_buffer(name), buffer), name
    expected = dict(ref.model.named_parameters(remove_duplicate=False))
    for name, param in lm.model.named_parameters(remove_duplicate=False):
        if not name.startswith("model.layers."):
            assert torch.equal(param, expected[name]), name
        else:
            assert param.is_meta, name  # blocks stay in the shards until used
    tied = lm.model.lm_head.weight is lm.model.model.embed_tokens.weight
    assert tied == bool(lm.model.config.tie_word_embeddings)


@pytest.mark.parametrize("sparsity", ["0.5", "2:4"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "crepe", "sparsegpt"])
def test_streamed_prune_is_bit_identical(sharded: Path, tmp_path: Path, method: str, sparsity: str) -> None:
    """Weights, masks, report and perplexity equal the in-memory prune; the folder reloads to the same logits."""
    streamed = prune(sharded, method, sparsity, tmp_path / "s", eval_split="test", max_memory=CAP)
    memory = prune(sharded, method, sparsity, tmp_path / "m", eval_split="test")
    assert streamed["model"]["streamed"] is True and memory["model"]["streamed"] is False
    a, b = tensors(tmp_path / "s"), tensors(tmp_path / "m")
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    assert streamed["prune"]["layers"] == memory["prune"]["layers"]  # zeros, N:M validity, mask counts per layer
    assert streamed["evaluation"]["ppl"] == memory["evaluation"]["ppl"]
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(a) and len(set(index["weight_map"].values())) == 1 + 3
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "s")(ids).logits
        want = AutoModelForCausalLM.from_pretrained(tmp_path / "m")(ids).logits
    assert torch.equal(got, want)


def test_streamed_bfloat16_prune_is_bit_identical(sharded: Path, tmp_path: Path) -> None:
    """A float32 checkpoint pruned at bfloat16: cast from the shards exactly as from_pretrained casts."""
    streamed = prune(sharded, "sparsegpt", "2:4", tmp_path / "s", dtype="bfloat16", eval_split="test",
                     max_memory="200KB")
    memory = prune(sharded, "sparsegpt", "2:4", tmp_path / "m", dtype="bfloat16", eval_split="test")
    assert streamed["model"]["streamed"] is True and memory["model"]["streamed"] is False
    a, b = tensors(tmp_path / "s"), tensors(tmp_path / "m")
    assert sorted(a) == sorted(b) and all(a[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]) for k in a)
    assert streamed["evaluation"]["ppl"] == memory["evaluation"]["ppl"]


@pytest.mark.parametrize(("method", "sparsity", "refine"),
                         [("wanda", "0.5", "dsnot"), ("ria", "2:4", "cp"), ("sparsegpt", "0.5", "dsnot")])
def test_streamed_refinements_are_bit_identical(sharded: Path, tmp_path: Path, method: str, sparsity: str,
                                                refine: str) -> None:
    streamed = prune(sharded, method, sparsity, tmp_path / "s", f"refine.method={refine}", max_memory=CAP)
    memory = prune(sharded, method, sparsity, tmp_path / "m", f"refine.method={refine}")
    a, b = tensors(tmp_path / "s"), tensors(tmp_path / "m")
    assert streamed["model"]["streamed"] is True and all(torch.equal(a[k], b[k]) for k in a)
    assert streamed["prune"]["layers"] == memory["prune"]["layers"]


def test_allocation_on_a_streamed_model_is_one_sentence(sharded: Path, tmp_path: Path) -> None:
    with pytest.raises(CrepeError, match="cannot run block by block on a streamed model"):
        prune(sharded, "wanda", "0.5", tmp_path / "o", "allocation.method=owl", max_memory=CAP)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("arch", ARCHS)
def test_every_tiny_architecture_streams_bit_identically(arch: str, tmp_path: Path) -> None:
    """Qwen-2/3 biases and norms, Mistral's sliding window, Gemma-3's embedding scale and two rotary tables."""
    tokenizer = word_tokenizer()
    model = build(arch, seed=0, attn="sdpa", vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path / "model", max_shard_size="60KB")
    tokenizer.save_pretrained(tmp_path / "model")
    cap = int(0.8 * Checkpoint(tmp_path / "model").nbytes(torch.float32))
    streamed = prune(tmp_path / "model", "wanda", "2:4", tmp_path / "s", eval_split="test", max_memory=cap)
    memory = prune(tmp_path / "model", "wanda", "2:4", tmp_path / "m", eval_split="test")
    assert streamed["model"]["streamed"] is True
    a, b = tensors(tmp_path / "s"), tensors(tmp_path / "m")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert streamed["evaluation"]["ppl"] == memory["evaluation"]["ppl"]


def test_streamed_perplexity_equals_in_memory(sharded: Path) -> None:
    """``crepe eval`` under the cap (several passes of windows, each block read once per pass) equals in memory."""
    budget = ("calibration.samples=4", "calibration.seqlen=16", "eval.ppl.seqlen=16", "eval.ppl.max_windows=9",
              "eval.ppl.batch_size=2", "data.eval_source=pydoc")
    streamed = front_door.evaluate(front_door.config(sharded, "wanda", "0.5", budget=budget, max_memory=CAP))
    memory = front_door.evaluate(front_door.config(sharded, "wanda", "0.5", budget=budget))
    assert streamed["model"]["extra"]["streamed"] and "streamed" not in memory["model"]["extra"]
    assert streamed["ppl"]["ppl"] == memory["ppl"]["ppl"]
    assert streamed["ppl"]["n_windows"] == 9
    lm = load_capped(str(sharded), max_memory=CAP)
    ids = torch.randint(0, 300, (1, 9 * 16), generator=torch.Generator().manual_seed(1))
    one = lm.streamer.perplexity(ids, 16, batch_size=2, windows_per_pass=2)
    many = lm.streamer.perplexity(ids, 16, batch_size=2, windows_per_pass=100)
    assert one.ppl == many.ppl and one.nll_sum == many.nll_sum


def test_verify_counts_zeros_from_the_shards(sharded: Path, tmp_path: Path) -> None:
    prune(sharded, "wanda", "2:4", tmp_path / "s", max_memory=CAP)
    capped = verify_release(tmp_path / "s", max_memory=CAP)
    free = verify_release(tmp_path / "s")
    assert capped["layers_checked"] == 21 and capped["nm_valid"] is True
    assert capped["ppl"]["ppl"] == free["ppl"]["ppl"]


def test_max_memory_below_one_block_is_one_sentence(sharded: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    code = main(["--no-progress", "prune", "--model", str(sharded), "--method", "magnitude", "--sparsity", "0.5",
                 "--out", str(out), "--max-memory", "100KB"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "smaller than one decoder block" in err and "model.layers.0 holds 147.97 KB" in err
    assert not out.exists()


def test_cli_eval_and_prune_stream_under_the_cap(sharded: Path, tmp_path: Path, capsys) -> None:
    common = ["--calib-source", "pydoc", "--eval-source", "pydoc", "--calib-samples", "2", "--seqlen", "16",
              "--max-windows", "3", "--max-memory", CAP]
    assert main(["--no-progress", "eval", "--model", str(sharded), *common]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert main(["--no-progress", "prune", "--model", str(sharded), "--method", "wanda", "--sparsity", "2:4",
                 "--out", str(tmp_path / "o"), *common]) == 0
    assert "streamed block by block" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "o"), "--max-memory", CAP, "--data-dir", str(tmp_path)]) == 0


def test_bad_max_memory_is_a_usage_error(sharded: Path, capsys) -> None:
    """A size the configuration cannot parse stops ``crepe eval`` with exit code 2 in one sentence."""
    code = main(["eval", "--model", str(sharded), "--max-memory", "lots"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "memory size 'lots' is not understood" in err


def _zero_shot_data() -> Path | None:
    from crepe import zeroshot as zs
    from crepe.data import resolve_data_dir

    data = resolve_data_dir()
    ok = data is not None and all((data / d.local_file).is_file() for d in zs.TASK_DATA.values())
    return data if ok else None


@pytest.mark.skipif(_zero_shot_data() is None, reason="the zero-shot data files are not available")
def test_streamed_zero_shot_equals_in_memory(sharded: Path) -> None:
    """lm-eval scores of the streamed model equal the in-memory ones bit for bit, one batch or all per group."""
    from crepe import zeroshot as zs
    from crepe.zeroshot.scorer import PackedLM  # needs lm-eval, an optional dependency

    settings = ('eval.zero_shot.tasks=["boolq","hellaswag"]', "eval.zero_shot.limit=4", "eval.zero_shot.batch_size=2")
    streamed = front_door.evaluate(front_door.config(sharded, "wanda", "0.5", *settings, budget=BUDGET,
                                                     max_memory=CAP), ppl=False, zero_shot=True)
    memory = front_door.evaluate(front_door.config(sharded, "wanda", "0.5", *settings, budget=BUDGET), ppl=False,
                                 zero_shot=True)
    assert streamed["model"]["extra"]["streamed"] and "streamed" not in memory["model"]["extra"]
    assert streamed["zero_shot"]["tasks"] == memory["zero_shot"]["tasks"]
    tasks = zs.build_tasks(["hellaswag", "rte"], zs.resolve_sources(["hellaswag", "rte"], _zero_shot_data()))
    with zs.quiet_lm_eval():
        for task in tasks.values():
            task.build_all_requests(limit=5)
    requests = [inst for task in tasks.values() for inst in task.instances]
    ref = load_model(str(sharded))
    want = PackedLM(ref.model, ref.tokenizer, batch_size=3).loglikelihood(requests)
    lm = load_capped(str(sharded), max_memory=CAP)
    for cap in (lm.streamer.cap, 10**9):  # under CAP every batch is its own group; 1 GB: one group for all
        lm.streamer.cap = cap
        scorer = PackedLM(lm.model, lm.tokenizer, batch_size=3, streamer=lm.streamer, device=lm.info.device)
        assert scorer.loglikelihood(requests) == want


def test_failure_leaves_nothing_half_written(tmp_path: Path) -> None:
    """A NaN in the last block stops the streamed prune after earlier blocks were written: no output remains."""
    model = save_llama(tmp_path / "nan", nan_layer="model.layers.2.mlp.down_proj")
    out = tmp_path / "runs" / "out"
    with pytest.raises(CrepeError, match=r"model\.layers\.2\.mlp\.down_proj has NaN"):
        prune(model, "magnitude", "0.5", out, max_memory=CAP)
    assert not out.exists() and list((tmp_path / "runs").iterdir()) == []


RSS_CHILD = textwrap.dedent("""
    import json, sys
    import psutil, torch
    from tasks.config import load_config
    from tasks.inputs import resolve
    from tasks.prune import prune_to_folder
    torch.set_num_threads(1)

    def hwm():  # the peak resident set size (VmHWM), in bytes
        line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024

    def run_prune(model, out, cap):  # crepe prune --method wanda --sparsity 0.5, 2 x 32 pydoc calibration tokens
        sets = [f"model.spec={json.dumps(model)}", "prune.method=wanda", "prune.sparsity='0.5'", "pho.enabled=false",
                "calibration.samples=2", "calibration.seqlen=32", "data.calib_source=pydoc", "data.eval_source=pydoc"]
        cfg = load_config(None, sets + ([f"model.max_memory={cap}"] if cap else []))
        return prune_to_folder(cfg, resolve(cfg)["model"], out)["manifest"]

    model, out, cap, warm = sys.argv[1], sys.argv[2], (sys.argv[3] if sys.argv[3] != "-" else None), sys.argv[4]
    run_prune(warm, out + "-warm", "380KB")  # every lazy import
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the peak to the current RSS: the imports' transient peak is not the run's
    base = psutil.Process().memory_info().rss
    manifest = run_prune(model, out, cap)
    print(json.dumps({"base": base, "increase": hwm() - base, "streamed": manifest["model"]["streamed"]}))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to reset the peak RSS")
def test_streamed_peak_rss_stays_far_below_the_in_memory_load(tmp_path: Path) -> None:
    """A 190 MB model: the streamed prune's peak RSS grows by a fraction of what the in-memory prune's does."""
    model = save_llama(tmp_path / "big", hidden=512, layers=16, intermediate=1376, tie=False, shard="30MB")
    weights = Checkpoint(model).nbytes(torch.float32)
    warm = save_llama(tmp_path / "warm")
    assert weights > 180e6

    def peak(cap: str, out: str) -> dict:
        env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(ROOT), "HOME": str(Path.home())}
        done = subprocess.run([sys.executable, "-c", RSS_CHILD, str(model), str(tmp_path / out), cap, str(warm)],
                              capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    streamed, memory = peak("40MB", "s"), peak("-", "m")
    assert streamed["streamed"] and not memory["streamed"]
    assert memory["increase"] > weights  # the whole model, at least
    # Measured: ~37 MB streamed (one 12.6 MB block, its scores and the allocator's slack; up to ~75 MB while
    # another process floods the page cache) against ~220 MB in memory.
    assert streamed["increase"] < 0.5 * memory["increase"], (streamed, memory)
    assert streamed["increase"] < 0.5 * weights, (streamed, weights)
    assert tensors(tmp_path / "s").keys() == tensors(tmp_path / "m").keys()


def test_calibration_windows_task_reads_only_the_tokenizer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline's calibration-windows task never loads the weights (here: unreadable) of the model."""
    import tasks.pipeline as T
    from tasks.config import load_config

    folder = save_llama(tmp_path / "model")
    for file in folder.glob("*.safetensors"):
        file.write_bytes(b"not a safetensors file")
    monkeypatch.setenv("CREPE_WORK_DIR", str(tmp_path / "work"))
    cfg = load_config(None, ["data.calib_source=pydoc", "calibration.samples=2", "calibration.seqlen=16"])
    out = T.calibration_windows.fn(cfg, str(folder), "model-hash", "data-sha")
    assert torch.load(out["path"], weights_only=True).shape == (2, 16)
