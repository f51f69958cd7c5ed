"""PHO searches in MLflow: one nested run per stage-1 trial and per verified stage-2 candidate, the
winner on the parent run, and the lookup of the best recorded configuration (hyperparameter transfer).

:class:`SearchRuns` is a mixin of :class:`tasks.tracking.MlflowTracker`; it uses the host's ``client``
(an ``MlflowClient``), ``experiment_id``, ``experiment_name``, ``set_tags``, ``log_metrics``,
``log_artifact``, ``log_plots``, ``_parent_info`` and ``_log_child``. Nested runs carry ``mlflow.parentRunId`` and a
deterministic ``crepe.trial_key``: a nested run already logged under the parent (a resumed pipeline,
:meth:`SearchRuns.log_search` called twice) is found by that tag and not logged again.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from crepe.errors import CrepeError
from tasks.keys import canonical_json
from tasks.tracking_values import TAG_PREFIX, params_hash, pattern_label, render, run_key


def load_pho(path: str | Path) -> dict[str, Any]:
    """A ``pho.json`` summary, checked for the keys :meth:`SearchRuns.log_search` needs."""
    p = Path(path)
    try:
        summary = json.loads(p.read_text())
    except FileNotFoundError:
        raise CrepeError(f"PHO summary {p} does not exist; run the search first (it writes pho.json)") from None
    except ValueError:
        raise CrepeError(f"PHO summary {p} is not valid JSON") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("trials"), list):
        raise CrepeError(f"{p} is not a PHO summary (no 'trials' list); give the pho.json of crepe search")
    for entry in (*summary["trials"], *(summary.get("verified") or [])):
        if not isinstance(entry, dict) or "index" not in entry or not isinstance(entry.get("params"), dict):
            raise CrepeError(f"{p} has a trial or candidate without 'index' and 'params'; it is not a PHO summary")
    return summary


def trial_key(trial: Mapping[str, Any]) -> str:
    """``trial:<index>:<params hash>``: the identity of a stage-1 trial under one parent run."""
    return f"trial:{int(trial['index'])}:{params_hash(trial['params'])}"


def candidate_key(result: Mapping[str, Any]) -> str:
    """``candidate:<index>:<params hash>``: the identity of a verified stage-2 candidate."""
    return f"candidate:{int(result['index'])}:{params_hash(result['params'])}"


def trial_run(trial: Mapping[str, Any]) -> dict[str, Any]:
    """The nested run of a trial ``{index, params, proxies, seconds, cpu_seconds}``: params
    alpha/beta/gamma/kernel_size, metrics every proxy + seconds + cpu_seconds."""
    index = int(trial["index"])
    return {"key": trial_key(trial), "name": f"trial-{index:03d}", "kind": "trial", "params": dict(trial["params"]),
            "metrics": {**dict(trial.get("proxies") or {}), "seconds": trial.get("seconds"),
                        "cpu_seconds": trial.get("cpu_seconds")},
            "tags": {f"{TAG_PREFIX}index": index, f"{TAG_PREFIX}stage": "screen"}}


def candidate_run(result: Mapping[str, Any], proxies: Mapping[str, Any] | None, winner: bool) -> dict[str, Any]:
    """The nested run of a verified candidate ``{index, params, ppl, seconds, cpu_seconds}``: metric
    ``validation_ppl`` (absent when non-finite: ``crepe.ppl_raw`` tag), the candidate's proxies if given,
    tag ``crepe.winner``."""
    index = int(result["index"])
    tags = {f"{TAG_PREFIX}index": index, f"{TAG_PREFIX}stage": "verify", f"{TAG_PREFIX}winner": render(bool(winner))}
    if result.get("ppl") is None:
        tags[f"{TAG_PREFIX}ppl_raw"] = str(result.get("ppl_raw", "non-finite"))
    return {"key": candidate_key(result), "name": f"candidate-{index:02d}", "kind": "candidate",
            "params": dict(result["params"]),
            "metrics": {"validation_ppl": result.get("ppl"), "seconds": result.get("seconds"),
                        "cpu_seconds": result.get("cpu_seconds"), **dict(proxies or {})},
            "tags": tags}


class SearchRuns:
    """PHO trials and candidates as nested runs, and the best recorded configuration (see the module)."""

    def child_keys(self, parent: Any) -> dict[str, str]:
        """``{crepe.trial_key: run_id}`` of ``parent``'s nested runs (one query per 1,000 runs)."""
        rid, exp_id, _ = self._parent_info(parent)
        keys, token = {}, None
        while True:
            page = self.client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{rid}'",
                                           max_results=1000, page_token=token)
            keys.update({r.data.tags[f"{TAG_PREFIX}trial_key"]: r.info.run_id for r in page
                         if r.data.tags.get(f"{TAG_PREFIX}trial_key")})
            token = page.token
            if not token:
                return keys

    def _log_nested(self, parent: Any, record: Mapping[str, Any]) -> str:
        rid, exp_id, tags = self._parent_info(parent)
        runs = self.client.search_runs(
            [exp_id], max_results=1,
            filter_string=f"tags.mlflow.parentRunId = '{rid}' and tags.`{TAG_PREFIX}trial_key` = '{record['key']}'")
        if runs:
            return runs[0].info.run_id
        return self._log_child((rid, exp_id, tags), record)

    def log_trial(self, parent: Any, trial: Mapping[str, Any]) -> str:
        """A nested run for one PHO stage-1 trial (see :func:`trial_run`); an already logged trial (same
        index and params) is not logged again. Returns the nested run id."""
        return self._log_nested(parent, trial_run(trial))

    def log_candidate(self, parent: Any, result: Mapping[str, Any], proxies: Mapping[str, Any] | None = None,
                      winner: bool = False) -> str:
        """A nested run for one verified stage-2 candidate (see :func:`candidate_run`); idempotent like
        :meth:`log_trial`. Returns the nested run id."""
        return self._log_nested(parent, candidate_run(result, proxies, winner))

    def log_search(self, parent: Any, pho_json: str | Path, artifacts: bool = True) -> dict[str, int]:
        """Log a finished PHO search (``pho.json`` of ``crepe search`` / ``run_search``) under ``parent``.

        - one nested run per ``trials`` entry and per ``verified`` entry not yet logged under ``parent``
          (one lookup query, then three store calls per new run), so a second call logs nothing;
        - on the parent: tags ``crepe.pho.winner`` (the winner's params as JSON), ``crepe.pho.model`` /
          ``crepe.pho.model_hash`` / ``crepe.pho.pattern`` (what the search actually ran on),
          ``crepe.pho.key`` (hash of the search config); metrics ``pho/validation_ppl`` (the winner's),
          ``pho/test_ppl``, ``pho/ria_validation_ppl``, ``pho/winner/<param>`` and ``pho/totals/<key>``;
        - artifacts (``artifacts=True``): ``search/pho.json`` and the PNG plots beside it under ``plots/``.

        A parent holds one search: logging a pho.json of a different configuration under it raises
        :class:`CrepeError`. Returns ``{"trials", "candidates", "skipped"}`` counts of nested runs.
        """
        path = Path(pho_json)
        summary = load_pho(path)
        info = self._parent_info(parent)
        rid, _, tags = info
        key = run_key(summary.get("config") or {})
        previous = tags.get(f"{TAG_PREFIX}pho.key")
        if previous and previous != key:
            raise CrepeError(
                f"MLflow run {rid} already holds a different PHO search (config key {previous}, this one {key}); "
                "log each search under its own run"
            )
        proxies_of = {params_hash(t["params"]): t.get("proxies") or {} for t in summary["trials"]}
        winner_index = int((summary.get("winner") or {}).get("index", -1))
        records = [trial_run(t) for t in summary["trials"]]
        records += [candidate_run(r, proxies_of.get(params_hash(r["params"])), int(r["index"]) == winner_index)
                    for r in summary.get("verified") or []]
        existing = self.child_keys(rid)
        counts = {"trials": 0, "candidates": 0, "skipped": 0}
        for record in records:
            if record["key"] in existing:
                counts["skipped"] += 1
                continue
            self._log_child(info, record)
            counts["trials" if record["kind"] == "trial" else "candidates"] += 1
        self._log_search_summary(rid, summary, key)
        if artifacts:
            self.log_artifact(rid, path, "search")
            plots = [Path(p) for p in (summary.get("plots") or {}).values()]
            plots += sorted(path.parent.glob("*.png"))
            self.log_plots(rid, dict.fromkeys(p for p in plots if p.is_file()))
        return counts

    def _log_search_summary(self, rid: str, summary: Mapping[str, Any], key: str) -> None:
        config = summary.get("config") or {}
        final = summary.get("final") or {}
        winner = summary.get("winner") or {}
        model = summary.get("model") or {}
        params = final.get("params") or winner.get("params") or {}
        tags = {f"{TAG_PREFIX}pho.key": key, f"{TAG_PREFIX}pho.winner": canonical_json(params),
                f"{TAG_PREFIX}pho.model": config.get("model") or model.get("spec"),
                f"{TAG_PREFIX}pho.model_hash": config.get("model_hash") or model.get("content_hash"),
                f"{TAG_PREFIX}pho.sampler": config.get("sampler")}
        if config.get("sparsity") is not None:
            tags[f"{TAG_PREFIX}pho.pattern"] = pattern_label(config["sparsity"])
        self.set_tags(rid, {k: v for k, v in tags.items() if v})
        self.log_metrics(rid, {"pho": {
            "validation_ppl": final.get("validation_ppl", winner.get("ppl")),
            "test_ppl": final.get("test_ppl"),
            "ria_validation_ppl": summary.get("ria_validation_ppl"),
            "winner": {k: v for k, v in params.items() if isinstance(v, int | float)},
            "totals": dict(summary.get("totals") or {}),
        }})

    def best_config(self, source_model: str, pattern: str | float) -> dict[str, Any] | None:
        """The best PHO configuration recorded for (``source_model``, ``pattern``), or None.

        Looks at FINISHED runs of ``source_model``'s experiment that carry a PHO result (logged by
        :meth:`log_search`) for that model spec and pattern (compared as canonical labels, so ``0.5`` and
        ``50%`` match), and returns the one with the lowest winner validation perplexity (ties: the most
        recent run): ``{"params", "validation_ppl", "test_ppl", "ria_validation_ppl", "run_id",
        "experiment", "model", "model_hash", "pattern", "method"}``. Creates no experiment.
        """
        label = pattern_label(pattern)
        exp_id = self.experiment_id(source_model, create=False)
        if exp_id is None:
            return None
        quoted = source_model.replace("'", "''")
        filt = (f"tags.`{TAG_PREFIX}pho.pattern` = '{label}' and tags.`{TAG_PREFIX}pho.model` = '{quoted}' "
                "and attributes.status = 'FINISHED'")
        best, token = None, None
        while True:
            page = self.client.search_runs([exp_id], filter_string=filt, max_results=1000, page_token=token)
            for r in page:
                ppl = r.data.metrics.get("pho/validation_ppl")
                if ppl is None or not math.isfinite(ppl) or not r.data.tags.get(f"{TAG_PREFIX}pho.winner"):
                    continue
                rank = (ppl, -(r.info.start_time or 0))
                if best is None or rank < best[0]:
                    best = (rank, r)
            token = page.token
            if not token:
                break
        if best is None:
            return None
        r = best[1]
        return {
            "params": json.loads(r.data.tags[f"{TAG_PREFIX}pho.winner"]),
            "validation_ppl": r.data.metrics["pho/validation_ppl"],
            "test_ppl": r.data.metrics.get("pho/test_ppl"),
            "ria_validation_ppl": r.data.metrics.get("pho/ria_validation_ppl"),
            "run_id": r.info.run_id,
            "experiment": self.experiment_name(source_model),
            "model": source_model,
            "model_hash": r.data.tags.get(f"{TAG_PREFIX}pho.model_hash"),
            "pattern": label,
            "method": r.data.tags.get(f"{TAG_PREFIX}method", "crepe"),
        }
