"""PHO's stage-1 objective (spec §8.1): proxies of one target linear pruned with CRePE(theta).

The target (default: block 0's ``self_attn.q_proj``) is scored from cached input norms
``||X_j||_2`` of a *dense* forward, then masked with the same pattern and selection rule as the
final prune, so each call costs one scoring, one selection and two sorts of one matrix.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from crepe.blocks import capture_inputs, find_blocks, model_device, run_block
from crepe.errors import CrepeError
from crepe.masks import LAYER_RULES, select_mask
from crepe.neighborhood import check_kernel_size
from crepe.scoring import score
from crepe.search.proxies import compute_proxies
from crepe.stats import InputNormAccumulator
from crepe.types import SparsitySpec, check_group, check_sparsity
from crepe.weights import PrunableWeight, prunable_weights

DEFAULT_TARGET = "self_attn.q_proj"
SEARCHED_PARAMS = ("alpha", "beta", "gamma", "kernel_size")


def find_target(
    model: nn.Module, module: str = DEFAULT_TARGET, block: int = 0, blocks_path: str | None = None
) -> PrunableWeight:
    """The weight ``module`` (a name inside one decoder block) of block number ``block``."""
    path, blocks = find_blocks(model, blocks_path)
    if isinstance(block, bool) or not isinstance(block, int) or not 0 <= block < len(blocks):
        raise CrepeError(f"block {block!r} does not exist; {path!r} has blocks 0..{len(blocks) - 1}")
    linears = prunable_weights(blocks[block])
    if module not in linears:
        raise CrepeError(
            f"block {block} of {path!r} has no linear {module!r}; its linears: {', '.join(linears)}"
        )
    return linears[module]


@torch.no_grad()
def target_input_norm(
    model: nn.Module,
    calib_ids: torch.Tensor,
    module: str = DEFAULT_TARGET,
    block: int = 0,
    blocks_path: str | None = None,
    batch_size: int = 8,
) -> torch.Tensor:
    """``||X_j||_2`` (in,) float32 of the input of ``module`` in block ``block``, dense model.

    The calibration windows ``calib_ids`` (n, seqlen) run through the unpruned blocks before
    ``block``; a forward hook accumulates squared inputs in float64 exactly as the pruner does.
    """
    target = find_target(model, module, block, blocks_path)
    if calib_ids.dim() != 2 or calib_ids.numel() == 0:
        raise CrepeError(f"calibration ids must have shape (n_samples, seqlen), got {tuple(calib_ids.shape)}")
    if batch_size < 1:
        raise CrepeError(f"batch_size must be >= 1, got {batch_size}")
    _, blocks = find_blocks(model, blocks_path)
    device = model_device(model)
    inputs = capture_inputs(model, blocks, calib_ids, batch_size, device)
    hidden = inputs.hidden
    for i in range(block):  # dense prefix: nothing before the target is pruned yet
        hidden = [
            run_block(blocks[i], h, inputs.args[i][c], inputs.kwargs[i][c]) for c, h in enumerate(hidden)
        ]
    if target.fused:
        raise CrepeError(f"the proxy target {module!r} is a fused expert slice; choose a linear such as {DEFAULT_TARGET!r}")
    acc = InputNormAccumulator(target.in_features, device)
    handle = target.module.register_forward_hook(lambda mod, inp, out: acc.add(inp[0]))
    try:
        for c, h in enumerate(hidden):
            run_block(blocks[block], h, inputs.args[block][c], inputs.kwargs[block][c])
    finally:
        handle.remove()
    return acc.norm()


class ProxyObjective:
    """``params -> proxies`` for one weight (out, in) with cached input norms (in,).

    ``sparsity_spec`` and ``group``/``rule`` must be those of the final prune: N:M groups when the
    spec has a pattern, else unstructured selection within ``group`` ("layer" for CRePE).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        act_norm: torch.Tensor,
        sparsity_spec: SparsitySpec,
        group: str = "layer",
        rule: str = "exact",
        kernel_size: int = 9,
    ) -> None:
        if weight.dim() != 2:
            raise CrepeError(f"the target weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
        if act_norm.shape != (weight.shape[1],):
            raise CrepeError(
                f"act_norm has shape {tuple(act_norm.shape)} but the weight has {weight.shape[1]} inputs"
            )
        if rule not in LAYER_RULES:
            raise CrepeError(f"unknown selection rule {rule!r}; allowed: {', '.join(LAYER_RULES)}")
        if sparsity_spec.pattern is None:
            check_sparsity(sparsity_spec.sparsity)
        elif weight.shape[1] % sparsity_spec.pattern.m:
            raise CrepeError(
                f"the target's input width {weight.shape[1]} is not divisible by M="
                f"{sparsity_spec.pattern.m} of pattern {sparsity_spec.pattern}"
            )
        # Private float32 copies: the model may be pruned in place later (stage 2).
        self.weight = weight.detach().to(torch.float32).clone()
        self.act_norm = act_norm.detach().to(device=self.weight.device, dtype=torch.float32).clone()
        self.spec = sparsity_spec
        self.group = check_group(group)
        self.rule = rule
        self.kernel_size = check_kernel_size(kernel_size)

    def scores(self, params: Mapping[str, Any]) -> torch.Tensor:
        """CRePE scores (out, in) for ``params`` {alpha, beta, gamma[, kernel_size]}."""
        unknown = sorted(set(params) - set(SEARCHED_PARAMS))
        if unknown:
            raise CrepeError(
                f"unknown search parameter {unknown[0]!r}; allowed: {', '.join(SEARCHED_PARAMS)}"
            )
        full = {"kernel_size": self.kernel_size, **params}
        return score("crepe", self.weight, self.act_norm, **full)

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        """Keep-mask with the final prune's pattern and selection rule."""
        if self.spec.pattern is not None:
            return select_mask(scores, pattern=self.spec.pattern)
        return select_mask(scores, self.spec.sparsity, group=self.group, rule=self.rule)

    def __call__(self, params: Mapping[str, Any]) -> dict[str, float]:
        """Every proxy of :data:`crepe.search.proxies.PROXY_NAMES`; ``gini_pruned`` is the objective."""
        s = self.scores(params)
        return compute_proxies(s, self.mask(s))
