"""How crepe's default CRePE coefficients were chosen: a small grid on the WikiText-2 *validation* split.

    .venv/bin/python -m bench.coefficient_sweep [--calib-samples 16] [--seqlen 256] [--max-windows 32]

Prunes the embedded SmolLM2 at 50% and 2:4 for each (alpha, beta, gamma) in a fixed grid (the RIA
point included) and prints validation perplexity. The test split is never used here. Until PHO
(issue 3) searches per model, docs/methods.md cites this table for the defaults.
"""

from __future__ import annotations

import argparse
import json

from crepe import data
from crepe.budget import Budget
from crepe.evaluate import perplexity
from crepe.models import load_model
from crepe.prune_config import build_config
from crepe.run import prune_loaded

GRID = [
    (1.0, 1.0, 0.0),  # RIA
    (1.0, 0.5, 0.0),
    (1.0, 1.0, 0.01),
    (1.0, 0.5, 0.01),
    (1.0, 0.5, 0.05),
    (1.0, 0.25, 0.01),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--max-windows", type=int, default=32)
    parser.add_argument("--patterns", default="0.5,2:4")
    args = parser.parse_args()
    budget = Budget(calib_samples=args.calib_samples, seqlen=args.seqlen, batch_size=8)
    lm = load_model("embedded:smollm2-135m", device="cpu")
    ids, info = data.get_eval_tokens(lm.tokenizer, "validation")
    rows = []
    print(f"validation data: {info.source} ({info.path}); calibration {args.calib_samples} x {args.seqlen}")
    print("| pattern | alpha | beta | gamma | validation ppl |\n|---|---:|---:|---:|---:|")
    for pattern in args.patterns.split(","):
        for alpha, beta, gamma in GRID:
            lm = load_model("embedded:smollm2-135m", device="cpu")
            config = build_config("crepe", pattern, {"alpha": alpha, "beta": beta, "gamma": gamma})
            prune_loaded(lm, config, budget)
            ppl = perplexity(lm.model, ids, args.seqlen, max_windows=args.max_windows).ppl
            rows.append({"pattern": pattern, "alpha": alpha, "beta": beta, "gamma": gamma, "val_ppl": ppl})
            print(f"| {pattern} | {alpha} | {beta} | {gamma} | {ppl:.3f} |", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
