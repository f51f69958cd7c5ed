"""A whole-model PHO context: the model loaded once, its calibration windows and a copy of its dense weights.

``SearchContext.evaluate(params, split)`` restores the dense weights, prunes the whole model with
CRePE(params) through the sequential pruner and returns the WikiText-2 perplexity of ``split``; the
proxy objective of stage 1 reads the dense target weight and its input norms. Stage 2 and hill climbing
select on the **validation** split; the test split is only ever reported. The jobs that drive a context
and write their results (``crepe search``, the pipeline's PHO tasks) live in ``tasks/``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from crepe.blocks import find_blocks
from crepe.budget import Budget, calibration_windows
from crepe.data import get_eval_tokens
from crepe.errors import CrepeError
from crepe.models import LoadedModel, load_model
from crepe.pruner import PruneConfig, prune_model
from crepe.run import evaluate_loaded
from crepe.search.objective import DEFAULT_TARGET, ProxyObjective, find_target, target_input_norm
from crepe.search.samplers import SAMPLERS, cma_population_size
from crepe.search.space import SearchSpace
from crepe.types import SparsitySpec, parse_sparsity
from crepe.weights import PrunableWeight, block_weights

Progress = Callable[[str, int, int], None]
# CMA-ES starts at the RIA-like point alpha = beta = 1, gamma = 1e-3 with sigma 0.25 (spec §8.4).
CMA_START: dict[str, float] = {"alpha": 1.0, "beta": 1.0, "gamma": 1e-3}
CMA_SIGMA = 0.25


def cma_start_mean(space: SearchSpace) -> list[float]:
    """:data:`CMA_START` in the unit cube of ``space`` (clipped into the box when it lies outside)."""
    lo_a, hi_a = space.alpha
    lo_b, hi_b = space.beta
    lo_g, hi_g = space.log10_gamma
    coords = [
        (CMA_START["alpha"] - lo_a) / (hi_a - lo_a),
        (CMA_START["beta"] - lo_b) / (hi_b - lo_b),
        (math.log10(CMA_START["gamma"]) - lo_g) / (hi_g - lo_g),
    ]
    if space.kernel_choices:
        coords.append(0.5)
    return [min(1.0, max(0.0, c)) for c in coords]


def check_search_args(sampler: str, n_trials: int, top_k: int, dim: int = 3) -> None:
    """Fail before any model is loaded on a budget the search cannot run (one sentence each)."""
    if sampler not in SAMPLERS:
        raise CrepeError(f"unknown sampler {sampler!r}; allowed: {', '.join(SAMPLERS)}")
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 2:
        raise CrepeError(f"--trials {n_trials!r} must be an integer >= 2 (the default is 60)")
    if sampler == "cmaes":
        cma_population_size(n_trials, dim)  # raises when no population fits n_trials exactly
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= n_trials:
        raise CrepeError(f"--top-k {top_k!r} must be an integer between 1 and --trials ({n_trials})")


def _spec(sparsity: str | float | SparsitySpec) -> SparsitySpec:
    return sparsity if isinstance(sparsity, SparsitySpec) else parse_sparsity(sparsity)


@dataclass
class SearchContext:
    """A loaded model, its calibration windows and dense weights, and cached evaluation tokens."""

    lm: LoadedModel
    spec: SparsitySpec
    budget: Budget
    rule: str = "exact"
    blocks: str | None = None
    progress: Progress | None = None
    selection: dict[str, Any] = field(default_factory=dict)  # targets/ignore/prune_router/moe_* of the prune
    calibration: tuple[torch.Tensor, dict[str, Any]] | None = None
    setup_seconds: float = 0.0
    _dense: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _tokens: dict[str, Any] = field(default_factory=dict, repr=False)
    _target_norm: dict[tuple[str, int], tuple[torch.Tensor, float]] = field(default_factory=dict, repr=False)

    @classmethod
    def create(
        cls,
        model: str,
        sparsity: str | float | SparsitySpec,
        budget: Budget,
        dtype: str = "float32",
        device: str = "auto",
        rule: str = "exact",
        blocks: str | None = None,
        progress: Progress | None = None,
        lm: LoadedModel | None = None,
        selection: Mapping[str, Any] | None = None,
    ) -> SearchContext:
        """Load ``model`` (unless ``lm`` is given), sample the calibration windows, copy the dense weights.

        The copy lives on the CPU (for a 70B-class model that is the model's size in host memory,
        the same as the offloaded model itself); restoring it is exact, bit for bit.
        """
        spec = _spec(sparsity)
        started = time.perf_counter()
        lm = lm if lm is not None else load_model(model, dtype=dtype, device=device)
        ctx = cls(lm=lm, spec=spec, budget=budget, rule=rule, blocks=blocks, progress=progress,
                  selection=dict(selection or {}))
        ctx.calibration = calibration_windows(lm.tokenizer, budget)
        for name, w in ctx._linears().items():
            ctx._dense[name] = w.matrix().detach().to("cpu", copy=True)
        ctx.setup_seconds = time.perf_counter() - started
        return ctx

    # -- weights -------------------------------------------------------------------------------
    def _linears(self) -> dict[str, PrunableWeight]:
        path, block_list = find_blocks(self.lm.model, self.blocks)
        sel = self.selection
        return {
            f"{path}.{i}.{name}": w
            for i, b in enumerate(block_list)
            for name, w in block_weights(b, f"{path}.{i}.", sel.get("targets"), sel.get("ignore"),
                                         bool(sel.get("prune_router"))).weights.items()
        }

    @torch.no_grad()
    def restore_dense(self) -> None:
        """Copy the dense weights back into every prunable linear (exact)."""
        for name, w in self._linears().items():
            w.matrix().copy_(self._dense[name])

    # -- data ----------------------------------------------------------------------------------
    def tokens(self, split: str) -> Any:
        if split not in self._tokens:
            b = self.budget
            self._tokens[split] = get_eval_tokens(self.lm.tokenizer, split, b.eval_source, b.data_dir)
        return self._tokens[split]

    def identity(self) -> dict[str, Any]:
        """What a resume file must agree on: model content, data, budget, pattern and rule."""
        calib = self.calibration[1] if self.calibration else {}
        b = self.budget
        return {
            "model": self.lm.info.spec,
            "model_hash": self.lm.info.content_hash,
            "dtype": self.lm.info.dtype,
            "sparsity": self.spec.label,
            "rule": self.rule,
            "calibration_tokens_sha256": calib.get("tokens_sha256"),
            "eval_source": b.eval_source,
            "eval_seqlen": b.eval_len,
            "max_windows": b.max_windows,
        }

    # -- the two objectives -----------------------------------------------------------------------
    def proxy_objective(self, module: str = DEFAULT_TARGET, block: int = 0, kernel_size: int = 9) -> ProxyObjective:
        """Stage 1's objective on the dense target module (its input norms are computed once)."""
        key = (module, block)
        if key not in self._target_norm:
            self.restore_dense()
            t0 = time.perf_counter()
            norm = target_input_norm(
                self.lm.model, self.calibration[0], module, block, self.blocks, self.budget.batch_size
            )
            self._target_norm[key] = (norm, time.perf_counter() - t0)
        weight = self._dense[self._target_name(module, block)].to(self.lm.info.device)
        return ProxyObjective(weight, self._target_norm[key][0], self.spec, "layer", self.rule, kernel_size)

    def target_norm_seconds(self, module: str = DEFAULT_TARGET, block: int = 0) -> float:
        return self._target_norm[(module, block)][1] if (module, block) in self._target_norm else 0.0

    def _target_name(self, module: str, block: int) -> str:
        target = find_target(self.lm.model, module, block, self.blocks)
        for name, m in self._linears().items():
            if m.module is target.module and m.attr == target.attr and m.expert == target.expert:
                return name
        raise CrepeError(
            f"the proxy target {module!r} of block {block} is not among the weights the prune touches "
            f"(targets={self.selection.get('targets')!r}, ignore={self.selection.get('ignore')!r}); choose another target"
        )

    def prune(self, params: Mapping[str, Any]) -> Any:
        """Restore the dense weights and prune the whole model with CRePE(``params``)."""
        self.restore_dense()
        config = PruneConfig("crepe", self.spec, dict(params), None, self.rule, **self.selection)
        prog = self.progress
        return prune_model(
            self.lm.model, self.calibration[0], config, self.lm.info.device, self.blocks,
            self.budget.batch_size, (lambda i, n, _s: prog("prune", i, n)) if prog else None,
        )

    def perplexity(self, split: str) -> float:
        return float(evaluate_loaded(self.lm, self.budget, split, self.progress, self.tokens(split))["ppl"])

    def evaluate(self, params: Mapping[str, Any], split: str = "validation") -> float:
        """Perplexity on ``split`` of the whole model pruned with CRePE(``params``)."""
        self.prune(params)
        return self.perplexity(split)

    def evaluate_method(self, method: str, split: str = "test") -> float:
        """Perplexity of a baseline (e.g. ``wanda``) with its defaults, on the same calibration data."""
        self.restore_dense()
        if method == "dense":
            return self.perplexity(split)
        config = PruneConfig(method, self.spec, {}, None, self.rule, **self.selection)
        prune_model(self.lm.model, self.calibration[0], config, self.lm.info.device, self.blocks,
                    self.budget.batch_size)
        return self.perplexity(split)
