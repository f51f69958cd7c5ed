"""Calibration statistics of every prunable weight's inputs, collected from the dense block.

For each weight: ``||X_j||_2`` per input channel (Wanda, RIA, CRePE), DSnoT's per-channel mean and
variance, and the ``X^T X`` of SparseGPT and of the ``obs`` weight update (:mod:`crepe.updates`). Linears, Conv1D and routers are observed with forward hooks.
Fused MoE experts are observed with a pre-hook on the experts module that replays the router's
decision: expert ``e`` sees exactly the tokens whose top-k contains ``e``, and its down projection
sees ``gate(x_e W_gu^T)`` computed with the dense expert weights, as the model's own forward does.
Per-expert linears only ever receive their routed tokens, so hooks see the right inputs directly.

``forced`` names experts calibrated on *all* tokens instead (the ``all-tokens`` rule for experts
the router sends too few tokens to, as llm-compressor's ``moe_calibrate_all_experts``): a fused
expert then takes every token, and a per-expert linear module is run on every token of its MoE
block's input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from crepe.errors import CrepeError
from crepe.refine.dsnot import MeanVarAccumulator
from crepe.sparsegpt import HessianAccumulator, gram
from crepe.weights import PrunableWeight


class InputNormAccumulator:
    """Running sum of squared inputs per input channel (float64); ``norm()`` is ``||X_j||_2``."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.sq_sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.n_tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)  # (tokens, in)
        self.sq_sum += (x * x).sum(dim=0).to(torch.float64)
        self.n_tokens += x.shape[0]

    def norm(self) -> torch.Tensor:
        return self.sq_sum.sqrt().to(torch.float32)


@dataclass
class LayerStats:
    """Calibration statistics of one weight's inputs (from the dense block's forward)."""

    act_norm: torch.Tensor | None = None  # ||X_j||_2
    mean_prime: torch.Tensor | None = None  # (1/n_seq) sum_t x_tj (DSnoT)
    var: torch.Tensor | None = None  # per-sequence population variance, token-weighted (DSnoT)
    hessian: torch.Tensor | None = None  # (2/n_seq) sum X^T X (SparseGPT, update obs)
    n_tokens: int = 0  # tokens this weight saw (the routed ones for an expert)


def _expert_parent(name: str) -> tuple[str, int] | None:
    """``mlp.experts.3.down_proj`` -> (``mlp``, 3): the MoE module owning the expert list."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if parts[i - 1] == "experts" and parts[i].isdigit():
            return ".".join(parts[: i - 1]), int(parts[i])
    return None


class BlockStats:
    """Hooks on a block's weights accumulating exactly the statistics the config needs.

    Linears fed the same input tensor in one forward (q/k/v, gate/up) share one ``X^T X``.
    """

    def __init__(
        self,
        block: nn.Module,
        weights: dict[str, PrunableWeight],
        device: torch.device,
        mean_var: bool,
        hessian: bool,
        forced: frozenset[str] = frozenset(),
    ) -> None:
        self.norms = {n: InputNormAccumulator(w.in_features, device) for n, w in weights.items()}
        self.mean_var = {n: MeanVarAccumulator(w.in_features, device) for n, w in weights.items()} if mean_var else {}
        self.hess = {n: HessianAccumulator(w.in_features, device) for n, w in weights.items()} if hessian else {}
        self._grams: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._forced = forced
        self._forcing = False
        self._hooks: list[Any] = []
        fused: dict[int, dict[tuple[str, int], str]] = {}
        fused_modules: dict[int, nn.Module] = {}
        for name, w in weights.items():
            if w.fused:
                fused.setdefault(id(w.module), {})[(w.attr, w.expert)] = name  # type: ignore[index]
                fused_modules[id(w.module)] = w.module
            else:
                only_forced = name in forced
                self._hooks.append(w.module.register_forward_hook(self._hook(name, only_forced)))
        for key, module in fused_modules.items():
            self._hooks.append(module.register_forward_pre_hook(self._experts_hook(fused[key]), with_kwargs=True))
        modules = dict(block.named_modules())
        per_parent: dict[str, set[int]] = {}
        for name in forced:
            w = weights.get(name)
            where = _expert_parent(name) if w is not None and not w.fused else None
            if where is not None:
                per_parent.setdefault(where[0], set()).add(where[1])
        for parent, experts in per_parent.items():
            self._hooks.append(modules[parent].register_forward_pre_hook(
                self._force_hook(modules[parent], experts), with_kwargs=True))

    # --- accumulation ---------------------------------------------------------------------------

    def _add(self, name: str, x: torch.Tensor, shared: bool = True) -> None:
        """Accumulate ``x``; ``shared=False`` for an input no other weight sees (an expert's routed
        tokens): its ``X^T X`` is not cached, so E experts do not hold 2E Gram matrices per chunk."""
        self.norms[name].add(x)
        if self.mean_var:
            self.mean_var[name].add(x)
        if self.hess:
            self.hess[name].add(x, self._gram(x) if shared else None)

    def _gram(self, x: torch.Tensor) -> torch.Tensor:
        for seen, g in self._grams:  # identity, not equality: the same tensor object in this forward
            if seen is x:
                return g
        g = gram(x)
        self._grams.append((x, g))
        return g

    def _hook(self, name: str, only_forced: bool) -> Callable[..., None]:
        def record(_mod: nn.Module, inp: tuple[Any, ...], _out: Any) -> None:
            if only_forced and not self._forcing:
                return  # a forced expert takes every token from the force hook, not its routed ones
            self._add(name, inp[0])

        return record

    def _experts_hook(self, names: dict[tuple[str, int], str]) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            x_all = hidden.reshape(-1, hidden.shape[-1])
            index = index.reshape(x_all.shape[0], -1)
            up_attr = "gate_up_proj" if getattr(module, "has_gate", True) else "up_proj"
            experts = sorted({e for (_, e) in names})
            for e in experts:
                up_name, down_name = names.get((up_attr, e)), names.get(("down_proj", e))
                forced = any(n in self._forced for n in (up_name, down_name) if n)
                x = x_all if forced else x_all[(index == e).any(dim=-1)]
                if x.shape[0] == 0:
                    continue
                if up_name:
                    self._add(up_name, x, shared=False)
                if down_name:
                    self._add(down_name, _expert_hidden(module, up_attr, e, x), shared=False)

        return record

    def _force_hook(self, parent: nn.Module, experts: set[int]) -> Callable[..., None]:
        def run_all(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))
            if not isinstance(hidden, torch.Tensor):
                raise CrepeError(
                    f"cannot find the input of MoE module {type(parent).__name__} to calibrate its starved experts "
                    "on all tokens; use moe_fallback magnitude"
                )
            flat = hidden.reshape(-1, hidden.shape[-1])
            self._forcing = True
            try:
                for e in sorted(experts):
                    parent.experts[e](flat)
            finally:
                self._forcing = False

        return run_all

    # --- results ----------------------------------------------------------------------------------

    def end_chunk(self) -> None:
        self._grams.clear()

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._grams.clear()

    def replace(self, name: str, other: BlockStats) -> None:
        """Take ``name``'s statistics from ``other`` (a second pass, e.g. all-tokens calibration)."""
        self.norms[name] = other.norms[name]
        if self.mean_var:
            self.mean_var[name] = other.mean_var[name]
        if self.hess:
            self.hess[name] = other.hess[name]

    def tokens(self, name: str) -> int:
        return self.norms[name].n_tokens

    def layer(self, name: str) -> LayerStats:
        mv = self.mean_var.get(name)
        hs = self.hess.get(name)
        seen = self.norms[name].n_tokens > 0
        return LayerStats(
            act_norm=self.norms[name].norm(),
            mean_prime=mv.mean_prime() if mv else None,
            var=mv.var() if mv else None,
            hessian=hs.hessian() if hs and seen else None,
            n_tokens=self.norms[name].n_tokens,
        )


def _expert_hidden(module: nn.Module, up_attr: str, e: int, x: torch.Tensor) -> torch.Tensor:
    """The down projection's input for expert ``e``: the gated up projection of ``x`` (dense)."""
    weight = getattr(module, up_attr)[e]
    out = x @ weight if module.is_transposed else nn.functional.linear(x, weight)
    if getattr(module, "has_bias", False):
        out = out + getattr(module, f"{up_attr}_bias")[e]
    if getattr(module, "has_gate", True):
        return module._apply_gate(out)
    return module.act_fn(out)
