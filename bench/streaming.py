"""Benchmark: pruning a model larger than ``--max-memory``, streamed block by block, against the in-memory prune.

A synthetic LLaMA-shaped model (random weights, seeded) is written straight to safetensors shards, one
block at a time, so the model is never whole in memory. Then ``tasks.prune.prune_to_folder`` (what
``crepe prune`` runs) runs twice, each in a fresh child process: streamed under ``--max-memory`` and, when the model fits in the machine's
available memory, in memory. Each child reports its wall time and its whole-process peak RSS (VmHWM,
imports included). The parent compares the two output folders tensor by tensor (read one at a time).

    .venv/bin/python -m bench.streaming [--quick] [--size-gb 6] [--max-memory 3GB] [--method wanda]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench._common import (
    add_common_args,
    command_line,
    machine_info,
    md_table,
    now,
    section_text,
    should_write,
    update_section,
)

GB = 10**9


def _hwm() -> int:
    """Peak resident set size of this process so far (VmHWM), in bytes."""
    with open("/proc/self/status") as fh:
        line = next(x for x in fh if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def build_model(folder: Path, tokenizer_spec: str, size_gb: float, hidden: int, intermediate: int, seed: int) -> dict:
    """Write a random LLaMA of about ``size_gb`` GB (float32) into ``folder``, one shard per block."""
    from transformers import AutoTokenizer, LlamaConfig

    from crepe.models import resolve_source
    from crepe.shards import INDEX, write_safetensors

    tokenizer = AutoTokenizer.from_pretrained(resolve_source(tokenizer_spec)[1])
    vocab = len(tokenizer)
    heads = hidden // 128
    per_block = 4 * (4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden)
    outside = 4 * (2 * vocab * hidden + hidden)
    layers = max(2, round((size_gb * GB - outside) / per_block))
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.float32
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    n = layers + 1
    weight_map: dict[str, str] = {}
    total = 0

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.02

    for k in range(n):
        if k == 0:
            tensors = {"model.embed_tokens.weight": rand(vocab, hidden), "lm_head.weight": rand(vocab, hidden),
                       "model.norm.weight": torch.ones(hidden)}
        else:
            p = f"model.layers.{k - 1}."
            tensors = {p + "input_layernorm.weight": torch.ones(hidden), p + "post_attention_layernorm.weight": torch.ones(hidden)}
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                tensors[f"{p}self_attn.{name}.weight"] = rand(hidden, hidden)
            tensors[p + "mlp.gate_proj.weight"] = rand(intermediate, hidden)
            tensors[p + "mlp.up_proj.weight"] = rand(intermediate, hidden)
            tensors[p + "mlp.down_proj.weight"] = rand(hidden, intermediate)
        name = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        total += write_safetensors(folder / name, tensors)
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {"layers": layers, "hidden": hidden, "intermediate": intermediate, "vocab": vocab, "bytes": total,
            "block_bytes": per_block, "outside_bytes": outside}


def child(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    from tasks.config import load_config
    from tasks.inputs import resolve
    from tasks.prune import prune_to_folder

    # `crepe prune --model M --method X --sparsity S --out O [--max-memory CAP]` with the calibration budget
    sets = [f"model.spec={json.dumps(args.model)}", f"prune.method={args.method}",
            f"prune.sparsity={json.dumps(args.sparsity)}", "pho.enabled=false", f"calibration.samples={args.calib_samples}",
            f"calibration.seqlen={args.seqlen}", "calibration.seed=0", f"data.calib_source={args.calib_source}"]
    if args.cap:
        sets.append(f"model.max_memory={json.dumps(args.cap)}")
    t0 = time.perf_counter()
    cfg = load_config(None, sets)
    result = prune_to_folder(cfg, resolve(cfg)["model"], args.out)
    seconds = time.perf_counter() - t0
    manifest = result["manifest"]
    print(json.dumps({"seconds": seconds, "peak_rss": _hwm(), "streamed": manifest["model"]["streamed"],
                      "timings": result["timings"], "sparsity": manifest["prune"]["overall_sparsity"],
                      "layers": [(x["name"], x["zeros"]) for x in manifest["prune"]["layers"]],
                      "calibration": (manifest["data"]["calibration"] or {}).get("tokens_sha256")}))
    return 0


def run_child(args: argparse.Namespace, model: Path, out: Path, cap: str | None, env: dict) -> dict:
    cmd = [sys.executable, "-m", "bench.streaming", "--child", "--model", str(model), "--out", str(out),
           "--method", args.method, "--sparsity", args.sparsity, "--calib-samples", str(args.calib_samples),
           "--seqlen", str(args.seqlen), "--calib-source", args.calib_source]
    if cap:
        cmd += ["--cap", cap]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parent.parent)
    if done.returncode != 0:
        raise SystemExit(f"child failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(a: Path, b: Path) -> dict:
    """Tensor-by-tensor comparison of two output folders (one tensor of each in memory at a time)."""
    from crepe.shards import Checkpoint

    ca, cb = Checkpoint(a), Checkpoint(b)
    same_names = sorted(ca.entries) == sorted(cb.entries)
    weights = masks = 0
    for name in sorted(set(ca.entries) & set(cb.entries)):
        x, y = ca.read(name), cb.read(name)
        weights += int(x.dtype == y.dtype and torch.equal(x, y))
        masks += int(torch.equal(x == 0, y == 0))
    return {"names_equal": same_names, "n_tensors": len(ca.entries), "weights_equal": weights, "masks_equal": masks}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--cap", help=argparse.SUPPRESS)
    parser.add_argument("--size-gb", type=float, default=6.0, help="synthetic model size on disk, float32 (default 6)")
    parser.add_argument("--max-memory", default="3GB", help="the streamed run's cap (default 3GB)")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--method", default="wanda")
    parser.add_argument("--sparsity", default="0.5")
    parser.add_argument("--calib-samples", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--calib-source", default="auto")
    parser.add_argument("--tokenizer", default="embedded:smollm2-135m", help="model whose tokenizer the synthetic model uses")
    parser.add_argument("--workdir", help="where the model and outputs go (default: a temp folder, removed afterwards)")
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    if args.quick:
        args.size_gb, args.max_memory, args.hidden, args.intermediate = 1.2, "1GB", 1024, 2816
    started = time.perf_counter()
    info = machine_info()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="crepe-bench-streaming-"))
    try:
        model = work / "model"
        if model.exists():
            shutil.rmtree(model)
        t0 = time.perf_counter()
        shape = build_model(model, args.tokenizer, args.size_gb, args.hidden, args.intermediate, seed=0)
        build_s = time.perf_counter() - t0
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "CREPE_CACHE_DIR": str(work / "cache")}
        from crepe.io import sha256_folder

        sha256_folder(model, exclude=("crepe_manifest.json",), memo=work / "cache" / "file-hashes.json")  # hash once
        from crepe.shards import parse_size

        available = int(__import__("psutil").virtual_memory().available)
        streamed = run_child(args, model, work / "streamed", args.max_memory, env)
        fits = shape["bytes"] * 1.6 < available
        memory = run_child(args, model, work / "memory", None, env) if fits else None
        same = compare(work / "streamed", work / "memory") if memory else None
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    cap = parse_size(args.max_memory)
    rows = [["streamed", f"{shape['bytes'] / GB:.2f}", f"{cap / GB:.2f}", f"{streamed['peak_rss'] / GB:.2f}",
             f"{streamed['seconds']:.1f}", f"{streamed['timings']['prune_total']:.1f}"]]
    if memory:
        rows.append(["in memory", f"{shape['bytes'] / GB:.2f}", "-", f"{memory['peak_rss'] / GB:.2f}",
                     f"{memory['seconds']:.1f}", f"{memory['timings']['prune_total']:.1f}"])
    table = md_table(["run", "model GB", "cap GB", "peak RSS GB", "prune_to_folder s", "prune s"], rows)
    ratio = streamed["seconds"] / memory["seconds"] if memory else None
    below = streamed["peak_rss"] < cap
    identical = bool(same and same["names_equal"] and same["weights_equal"] == same["masks_equal"] == same["n_tensors"])
    body = (
        f"Synthetic LLaMA ({shape['layers']} blocks, hidden {shape['hidden']}, intermediate {shape['intermediate']}, "
        f"vocab {shape['vocab']}, untied head; random weights, seed 0), float32, {shape['bytes'] / GB:.2f} GB in "
        f"{shape['layers'] + 1} safetensors shards (one block is {shape['block_bytes'] / GB:.3f} GB, the tensors "
        f"outside the blocks {shape['outside_bytes'] / GB:.3f} GB), written block by block in {build_s:.0f} s. "
        f"`{args.method}` at {args.sparsity}, calibration {args.calib_samples} x {args.seqlen} tokens; each run is "
        f"`tasks.prune.prune_to_folder` in a fresh process (load, calibration, prune, save); peak RSS = VmHWM of the whole "
        f"process, imports included. Available memory at the start: {available / GB:.1f} GB.\n\n{table}\n\n"
        + (f"Streamed / in memory wall time: **{ratio:.2f}**. Output folders: {same['n_tensors']} tensors, "
           f"{same['weights_equal']} bit-identical weights, {same['masks_equal']} identical masks."
           if memory else "The in-memory run was skipped: the model does not fit in this machine's available memory.")
    )
    targets = [f"streamed peak RSS below the cap ({streamed['peak_rss'] / GB:.2f} < {cap / GB:.2f} GB): "
               f"{'**PASS**' if below else '**FAIL**'}"]
    if memory:
        targets.append(f"masks and weights bit-identical to the in-memory prune: {'**PASS**' if identical else '**FAIL**'}")
        targets.append(f"(reported) time streamed / in memory: {ratio:.2f}")
    wall = time.perf_counter() - started
    raw = {"machine": info, "shape": shape, "streamed": {k: v for k, v in streamed.items() if k != "layers"},
           "memory": {k: v for k, v in memory.items() if k != "layers"} if memory else None, "compare": same,
           "layers_equal": memory["layers"] == streamed["layers"] if memory else None}
    text = section_text("Streamed prune of a model larger than --max-memory", command_line("bench.streaming"), info,
                        now(), wall, body, targets, raw)
    print(text)
    if should_write(args):
        update_section("streaming", text)
    return 0 if below and (identical or not memory) else 1


if __name__ == "__main__":
    raise SystemExit(main())
