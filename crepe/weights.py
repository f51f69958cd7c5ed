"""Prunable weight matrices inside decoder blocks, whatever module holds them.

Every matrix is seen as ``(out, in)``: N:M groups and the activation statistics run along ``in``.

- ``linear``: ``nn.Linear`` and its subclasses (Falcon's ``FalconLinear``, ...);
- ``conv1d``: GPT-2-style ``Conv1D``, whose weight is stored ``(in, out)`` (seen transposed);
- ``expert``: one expert's slice of a fused 3-D expert parameter (transformers' experts interface:
  ``gate_up_proj`` / ``up_proj`` / ``down_proj`` of shape ``(E, out, in)``, or ``(E, in, out)`` when
  the module says ``is_transposed``), named ``<module>.<param>[<expert>]``;
- ``expert`` also covers per-expert linears (``...experts.<e>.<proj>``), with ``expert=e``;
- ``router``: the router/gate that picks experts (a 2-D weight); not pruned unless asked.

Any other parameter of two or more dimensions in a block (a convolution, an embedding, a 3-D
tensor outside the experts interface, ...) is refused by name unless ``ignore`` excludes it, so a
weight type crepe cannot handle is never skipped silently. One-dimensional parameters (norms,
biases, scales) are not weight matrices and are not listed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from crepe.errors import CrepeError

EXPERT_PARAMS = ("gate_up_proj", "up_proj", "down_proj")
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")
_EXPERT_INDEX = re.compile(r"(?:^|\.)experts\.(\d+)\.")


@dataclass(eq=False)
class PrunableWeight:
    """One ``(out, in)`` matrix that crepe can prune, and where it lives."""

    name: str  # name inside its block, e.g. "self_attn.q_proj" or "mlp.experts.down_proj[3]"
    kind: str  # linear | conv1d | expert | router
    module: nn.Module  # the module that owns the parameter (and receives its inputs)
    attr: str = "weight"  # the parameter's attribute name on ``module``
    expert: int | None = None  # expert index (fused slice or per-expert linear)
    transposed: bool = False  # stored (in, out)
    fused: bool = False  # a slice of a 3-D experts parameter

    @property
    def param(self) -> nn.Parameter:
        return getattr(self.module, self.attr)

    def matrix(self) -> torch.Tensor:
        """The ``(out, in)`` view of the stored data: in-place edits write through."""
        data = self.param.data
        if self.fused:
            data = data[self.expert]
        return data.t() if self.transposed else data

    @property
    def weight(self) -> torch.Tensor:
        """Alias of :meth:`matrix`, so a PrunableWeight reads like an ``nn.Linear``."""
        return self.matrix()

    @property
    def shape(self) -> tuple[int, int]:
        stored = tuple(self.param.shape[-2:])
        return (stored[1], stored[0]) if self.transposed else (stored[0], stored[1])

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass
class BlockWeights:
    """The prunable matrices of one block, plus every matrix left dense and why."""

    weights: dict[str, PrunableWeight] = field(default_factory=dict)
    skipped: dict[str, tuple[PrunableWeight, str]] = field(default_factory=dict)


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D  # heavy (~0.7 s): lazy, only GPT-2-style models use it
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def is_fused_experts(module: nn.Module) -> bool:
    """A module of transformers' experts interface holding 3-D expert parameters."""
    return hasattr(module, "is_transposed") and any(
        isinstance(getattr(module, p, None), nn.Parameter) and getattr(module, p).dim() == 3 for p in EXPERT_PARAMS
    )


def _is_router(name: str, module: nn.Module, parents: dict[str, nn.Module]) -> bool:
    """A router: a ``*Router`` module, a gate/router next to ``experts``, or a linear inside either
    (HunYuan's ``mlp.gate.wg``, AFMoE's ``mlp.router.gate``)."""
    if "router" in type(module).__name__.lower():
        return True
    parent_name, _, last = name.rpartition(".")
    parent = parents.get(parent_name)
    if parent is None:
        return False
    if last in ROUTER_NAMES and hasattr(parent, "experts"):
        return True
    return bool(parent_name) and parent is not module and _is_router(parent_name, parent, parents) and not hasattr(
        parent, "experts")


def _describe(module: nn.Module, attr: str, param: torch.Tensor) -> str:
    return f"{type(module).__name__}.{attr} of shape {tuple(param.shape)}"


def block_weights(
    block: nn.Module,
    prefix: str = "",
    targets: str | None = None,
    ignore: str | None = None,
    prune_router: bool = False,
) -> BlockWeights:
    """Classify every parameter of two or more dimensions in ``block``.

    ``targets`` / ``ignore`` are regular expressions searched in the full name (``prefix`` + name);
    a weight is pruned when it matches ``targets`` (default: everything) and not ``ignore``. Raises
    CrepeError naming the first matrix of a type crepe cannot prune that ``ignore`` does not exclude.
    """
    conv1d = _conv1d_type()
    modules = dict(block.named_modules())
    out = BlockWeights()
    target_re = re.compile(targets) if targets else None
    ignore_re = re.compile(ignore) if ignore else None

    def place(w: PrunableWeight) -> None:
        full = prefix + w.name
        if ignore_re is not None and ignore_re.search(full):
            out.skipped[w.name] = (w, "excluded by ignore")
        elif target_re is not None and not target_re.search(full):
            out.skipped[w.name] = (w, "not matched by targets")
        elif w.kind == "router" and not prune_router:
            out.skipped[w.name] = (w, "router/gate weights are not pruned by default (prune_router)")
        else:
            out.weights[w.name] = w

    for mname, module in modules.items():
        for attr, param in module.named_parameters(recurse=False):
            if param is None or param.dim() < 2:
                continue
            name = f"{mname}.{attr}" if mname else attr
            if isinstance(module, nn.Linear) and attr == "weight":
                router = _is_router(mname, module, modules)
                m = _EXPERT_INDEX.search(f".{mname}.")
                kind = "router" if router else ("expert" if m else "linear")
                place(PrunableWeight(mname, kind, module, expert=int(m.group(1)) if m and not router else None))
            elif conv1d is not None and isinstance(module, conv1d) and attr == "weight":
                place(PrunableWeight(mname, "conv1d", module, transposed=True))
            elif is_fused_experts(module) and attr in EXPERT_PARAMS and param.dim() == 3:
                for e in range(param.shape[0]):
                    place(PrunableWeight(
                        f"{name}[{e}]", "expert", module, attr, expert=e,
                        transposed=bool(module.is_transposed), fused=True,
                    ))
            elif param.dim() == 2 and attr.endswith("bias"):
                continue  # stacked per-expert biases, a router's score-correction bias: vectors, not matrices
            elif attr == "weight" and param.dim() == 2 and _is_router(mname, module, modules):
                place(PrunableWeight(mname, "router", module))
            else:
                full = prefix + name
                what = _describe(module, attr, param)
                if ignore_re is not None and ignore_re.search(full):
                    out.skipped[name] = (PrunableWeight(name, "other", module, attr), f"excluded by ignore ({what})")
                    continue
                raise CrepeError(
                    f"block weight {full} ({what}) is of a type crepe cannot prune; exclude it with "
                    "--ignore REGEX or prune a model without it"
                )
    return out


def prunable_weights(block: nn.Module) -> dict[str, PrunableWeight]:
    """The weights a default prune touches in ``block`` (no targets/ignore, routers left dense)."""
    return block_weights(block).weights


def check_regex(value: str | None, what: str) -> str | None:
    """Compile-check a ``--targets``/``--ignore`` expression; one sentence on error."""
    if value is None or value == "":
        return None
    try:
        re.compile(value)
    except re.error as exc:
        raise CrepeError(f"{what} {value!r} is not a valid regular expression ({exc})") from None
    return value
