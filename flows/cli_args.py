"""The command line's arguments and how they become one validated configuration.

Every command that prunes, evaluates or searches reads the pipeline configuration: ``--params FILE``
(default: ``params.yaml`` when the current folder has one, else the built-in defaults, which equal the
shipped ``params.yaml``) plus ``-S section.key=value`` overrides. Convenience flags such as ``--method`` or
``--seqlen`` are sugar for ``-S``: :func:`config_for` turns each flag that was given into an override
(JSON-quoted, so a regex or a path is never re-read as YAML), and the schema validates everything once.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from crepe.allocation import ALLOCATORS
from crepe.errors import CrepeError
from crepe.methods import all_methods
from crepe.refine import REFINES
from crepe.updates import UPDATES
from tasks.config import DEFAULT_PARAMS, ConfigError, PipelineConfig, load_config
from tasks.params_file import load_params_file

Progress = Callable[[str, int, int], None]


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one sentence, exit 2 (argparse's own convention)
        self.print_usage(sys.stderr)
        sys.stderr.write(f"crepe: error: {message}\n")
        raise SystemExit(2)


def int_at_least(minimum: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} must be {what}")
        return value

    return parse


positive_int = int_at_least(1, "a positive integer")
nonneg_int = int_at_least(0, ">= 0")


def number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE parsed as JSON when it can be (numbers, true/false, null), else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key.strip().replace("-", "_"), value


def progress_bars(enabled: bool) -> Progress | None:
    """A ``(stage, done, total)`` callback drawing one tqdm bar per stage on stderr (None: no bars)."""
    if not enabled:
        return None
    bars: dict[str, Any] = {}

    def update(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None or bar.total != total or done < bar.n:
            if bar is not None:
                bar.close()
            bar = bars[stage] = tqdm(total=total, desc=stage, unit="blk" if stage == "prune" else "win",
                                     file=sys.stderr, leave=False, dynamic_ncols=True)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            bars.pop(stage, None)

    return update


# --- argument groups -------------------------------------------------------------------------------------


def add_config_args(p: argparse.ArgumentParser, default: str | None = DEFAULT_PARAMS) -> None:
    """``--params FILE`` and repeatable ``-S/--set section.key=value``."""
    p.add_argument("--params", default=default,
                   help="pipeline parameters file (default: %s)" % (default or "params.yaml when present, else the "
                                                                      "built-in defaults (the same values)"))
    p.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one parameter, e.g. -S prune.sparsity=0.6 (repeatable; YAML values)")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="embedded:smollm2-135m (default), embedded:gemma3-270m, a hub id or a local folder"
                   " (-S model.spec)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="-S model.dtype (default float32)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (default; -S model.device)")
    p.add_argument("--blocks", help="dotted path of the decoder block list, when auto-detection fails")
    p.add_argument("--max-memory", metavar="SIZE",
                   help="host memory the model may use, e.g. 3GB or 512MiB (default: what is available); a model "
                   "whose weights do not fit is streamed from its shards one decoder block at a time")


def add_budget_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data budget (default: the --params file)")
    g.add_argument("--calib-samples", type=positive_int, help="calibration windows (-S calibration.samples)")
    g.add_argument("--seqlen", type=positive_int, help="tokens per calibration and evaluation window")
    g.add_argument("--max-windows", type=positive_int,
                   help="evaluate only the first N perplexity windows (-S eval.ppl.max_windows)")
    g.add_argument("--batch-size", type=positive_int, help="calibration windows per forward pass")
    g.add_argument("--eval-batch-size", type=positive_int,
                   help="perplexity windows per forward pass (each holds seqlen x vocab logits)")
    g.add_argument("--seed", type=nonneg_int, help="calibration sampling seed (-S calibration.seed)")
    g.add_argument("--calib-source", help="auto, c4, c4-local, c4-hub or pydoc")
    g.add_argument("--eval-source", help="auto, wikitext2, wikitext2-local, wikitext2-hub or pydoc")
    g.add_argument("--data-dir", help="local data folder (default: $CREPE_DATA_DIR, else ../shared/data)")


def add_method_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--method", required=required, choices=list(all_methods()), metavar="METHOD",
                   help=f"{', '.join(all_methods())} (see `crepe methods`)")
    p.add_argument("--sparsity", required=required, help="a fraction in [0, 1) such as 0.5, or N:M such as 2:4 or 4:8")
    p.add_argument("--update", choices=list(UPDATES),
                   help="; ".join(f"{n}: {e.doc}" for n, e in UPDATES.items()) + " (-S prune.update)")
    g = p.add_argument_group("method parameters (CRePE/RIA)")
    g.add_argument("--alpha", type=number, help="CRePE row-term coefficient")
    g.add_argument("--beta", type=number, help="CRePE column-term coefficient")
    g.add_argument("--gamma", type=number, help="CRePE neighbourhood-term coefficient")
    g.add_argument("--kernel-size", type=int, help="CRePE neighbourhood window K (odd, default 9)")
    g.add_argument("--a", type=number, dest="act_exponent", help="activation-norm exponent (RIA/CRePE, default 0.5)")
    g.add_argument("--params-from", help="JSON file with coefficients (e.g. a search result); flags override it")
    g.add_argument("--group", choices=["row", "layer"], help="unstructured comparison group (default: the method's own)")
    g.add_argument("--rule", choices=["exact", "threshold"],
                   help="per-layer selection: exact counts (default) or the official <= threshold rule")


def add_refine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("refinement and layer-wise allocation")
    g.add_argument("--refine", choices=list(REFINES),
                   help="; ".join(f"{n}: {e.doc}" for n, e in REFINES.items()))
    g.add_argument("--refine-param", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="refinement parameter, repeatable (e.g. skip_layer=mlp, max_cycle_time=50, reweight=prune)")
    g.add_argument("--allocation", choices=list(ALLOCATORS),
                   help="non-uniform per-block sparsity whose mean is --sparsity (unstructured only)")
    g.add_argument("--allocation-param", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="allocation parameter, repeatable (e.g. lam=0.08, m=5)")
    w = p.add_argument_group("which weights (matched against full names such as model.layers.0.mlp.experts.down_proj[3])")
    w.add_argument("--targets", metavar="REGEX", help="prune only the block weights whose name matches (default: all)")
    w.add_argument("--ignore", metavar="REGEX", help="leave the block weights whose name matches dense (listed in the report)")
    w.add_argument("--prune-router", action="store_true", default=None,
                   help="also prune MoE router/gate weights (default: left dense)")
    w.add_argument("--moe-min-tokens", type=nonneg_int,
                   help="an expert routed fewer calibration tokens follows --moe-fallback (default 16)")
    w.add_argument("--moe-fallback", choices=["all-tokens", "magnitude"],
                   help="all-tokens: calibrate a starved expert on every token; magnitude: score it by |W|")


# --- flags -> overrides -> one validated config ----------------------------------------------------------

# flag attribute -> the config keys it sets (the same value in each)
FLAG_KEYS: dict[str, tuple[str, ...]] = {
    "model": ("model.spec",), "dtype": ("model.dtype",), "device": ("model.device",), "blocks": ("model.blocks",),
    "max_memory": ("model.max_memory",),
    "calib_samples": ("calibration.samples",), "seqlen": ("calibration.seqlen", "eval.ppl.seqlen"),
    "max_windows": ("eval.ppl.max_windows",), "batch_size": ("calibration.batch_size",),
    "eval_batch_size": ("eval.ppl.batch_size",), "seed": ("calibration.seed",),
    "calib_source": ("data.calib_source",), "eval_source": ("data.eval_source",), "data_dir": ("data.data_dir",),
    "method": ("prune.method",), "sparsity": ("prune.sparsity",), "group": ("prune.group",), "rule": ("prune.rule",),
    "refine": ("refine.method",), "allocation": ("allocation.method",),
    "targets": ("prune.targets",), "ignore": ("prune.ignore",), "prune_router": ("prune.prune_router",),
    "moe_min_tokens": ("prune.moe_min_tokens",), "moe_fallback": ("prune.moe_fallback",), "update": ("prune.update",),
}
METHOD_FLAGS = {"alpha": "alpha", "beta": "beta", "gamma": "gamma", "kernel_size": "kernel_size", "act_exponent": "a"}


def _set(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value)}"  # JSON is YAML 1.2: a quoted string stays a string


def _flag(attr: str) -> str:
    return "--" + {"act_exponent": "a"}.get(attr, attr).replace("_", "-")


def flag_overrides(args: argparse.Namespace, skip: Iterable[str] = ()) -> dict[str, str]:
    """The ``-S`` overrides the given convenience flags stand for (flags left out change nothing), each
    mapped to the flag as the user typed it (for error messages)."""
    out: dict[str, str] = {}
    skip = set(skip)
    for attr, keys in FLAG_KEYS.items():
        value = getattr(args, attr, None)
        if value is not None and attr not in skip:
            out.update({_set(k, value): f"{_flag(attr)} {value}" for k in keys})
    if getattr(args, "params_from", None):
        for key, value in load_params_file(args.params_from, args.method).items():
            out[_set(f"prune.params.{key}", value)] = f"--params-from {args.params_from}"
    for attr, key in METHOD_FLAGS.items():
        if getattr(args, attr, None) is not None:
            out[_set(f"prune.params.{key}", getattr(args, attr))] = f"{_flag(attr)} {getattr(args, attr)}"
    for attr, section in (("refine_param", "refine"), ("allocation_param", "allocation")):
        for key, value in getattr(args, attr, None) or []:
            out[_set(f"{section}.params.{key}", value)] = f"{_flag(attr)} {key}={value}"
    return out


def config_for(args: argparse.Namespace, fixed: Iterable[str] = (), skip: Iterable[str] = (),
               more_flags: dict[str, str] | None = None) -> PipelineConfig:
    """The validated configuration of a command: ``--params`` (see the module docstring), then the overrides
    the flags stand for, then ``fixed`` (what the command implies, e.g. no PHO for ``crepe prune``), then the
    user's ``-S``. A bad flag value is reported under the flag's own name (``more_flags``: a command's own
    flag overrides, override -> flag as typed)."""
    path = getattr(args, "params", None)
    if path is None and Path(DEFAULT_PARAMS).is_file():
        path = DEFAULT_PARAMS
    flags = {**flag_overrides(args, skip), **(more_flags or {})}
    try:
        return load_config(path, [*flags, *fixed, *getattr(args, "overrides", [])])
    except ConfigError as exc:
        flag = flags.get(exc.where.removeprefix("-S ")) if exc.where.startswith("-S ") else None
        if flag is None:
            raise
        problem = re.sub(rf"^{re.escape(exc.path)} = .*?: ", "", exc.problem) if exc.path else exc.problem
        raise CrepeError(f"{flag}: {problem}") from None


def check_folder_out(out: str | Path) -> Path:
    """A folder the command may write into (created when missing); a file is refused in one sentence."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise CrepeError(f"--out {path} exists and is a file; give a folder path")
    return path
