"""Zero-shot evaluation (spec §14.2): lm-eval's own tasks on local files, offline, on in-memory models.

- each of the six tasks loads from the local data directory with its official document count;
- the first document of each task renders exactly as lm-eval's built-in task renders it (the
  built-in task is built by lm-eval's TaskManager from its own YAML and fed the same raw record);
- a tiny model completes ``limit=8`` with metrics in [0, 1]; in-memory == saved-and-reloaded;
- crepe's scorer (an ``lm_eval.api.model.LM``) equals stock ``HFLM`` bit for bit (``pack=False``) and a
  one-request-at-a-time reference loop up to float rounding (packed rows), on five architectures
  (hypothesis); ``run_zero_shot(pack=False)`` runs stock ``HFLM`` with the same accuracies;
- crepe.zeroshot uses lm-eval's public API only (no underscore modules or names);
- bad input: unknown task, missing file while offline, ``--limit`` < 1, truncated file.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from local_models import save_tiny_llama, word_tokenizer
from tiny_models import VOCAB, build

from crepe import zeroshot as zs
from crepe.data import resolve_data_dir
from crepe.errors import CrepeError
from crepe.zeroshot.scorer import stock_hflm
from tasks.zeroshot import format_zero_shot_table, zero_shot_metrics

DATA = resolve_data_dir()
needs_data = pytest.mark.skipif(
    DATA is None or not all((DATA / d.local_file).is_file() for d in zs.TASK_DATA.values()),
    reason="the zero-shot data files (../shared/data or $CREPE_DATA_DIR) are not available",
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("zs") / "tiny")


@pytest.fixture(scope="module")
def tiny_lm(tiny_dir: Path):
    from crepe.models import load_model

    return load_model(str(tiny_dir), device="cpu")


@pytest.fixture(scope="module")
def local_tasks():
    names = list(zs.TASKS)
    return zs.build_tasks(names, zs.resolve_sources(names, DATA))


def _first_record(path: Path) -> dict:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).slice(0, 1).to_pylist()[0]
    with open(path) as fh:
        return json.loads(fh.readline())


def _requests(task) -> list[tuple[str, str]]:
    with zs.quiet_lm_eval():
        task.build_all_requests(limit=1)
    return [inst.args for inst in task.instances]


# --- data sources -------------------------------------------------------------------------------


@needs_data
def test_six_tasks_load_from_local_files_with_official_counts(local_tasks) -> None:
    assert list(local_tasks) == list(zs.TASKS)
    official = {"boolq": 3270, "rte": 277, "mnli": 9815, "hellaswag": 10042, "arc_easy": 2376, "arc_challenge": 1172}
    for name, task in local_tasks.items():
        assert task.config.dataset_path in ("json", "parquet"), name
        files = task.config.dataset_kwargs["data_files"]
        assert list(files.values()) == [str(DATA / zs.TASK_DATA[name].local_file)]
        assert len(task.eval_docs) == official[name] == zs.TASK_DATA[name].official_count, name
        assert task.config.num_fewshot == 0
        metrics = [m["metric"] for m in task.config.metric_list]
        assert metrics == (["acc", "acc_norm"] if name in ("hellaswag", "arc_easy", "arc_challenge") else ["acc"])


def test_sources_hub_when_online_and_error_naming_the_file_when_offline(tmp_path, monkeypatch) -> None:
    (tmp_path / "rte").mkdir()
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    sources = zs.resolve_sources(["rte", "boolq"], tmp_path)
    assert sources["rte"].kind == "hub" and sources["rte"].path == "nyu-mll/glue rte"
    assert zs.source_overrides("rte", sources["rte"], {}) == {}
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(CrepeError) as err:
        zs.run_zero_shot(None, None, ["boolq", "rte"], data_dir=tmp_path)  # fails before touching the model
    msg = str(err.value)
    assert str(tmp_path / "boolq" / "super_glue_boolq_validation.jsonl") in msg
    assert "offline" in msg and "--data-dir" in msg and "3270 rows" in msg


def test_task_yaml_includes_the_builtin_file_and_changes_only_data_location(tmp_path) -> None:
    src = zs.TaskSource("arc_challenge", "local", "/d/arc/ARC-Challenge-test.jsonl", "test")
    doc = zs.task_yaml("arc_challenge", src)
    assert doc == {"include": str(zs.builtin_yaml("arc_challenge")), "task": "arc_challenge", "num_fewshot": 0,
                   "dataset_path": "json", "dataset_name": None, "dataset_kwargs": {"data_files": {"test": src.path}},
                   "training_split": None, "validation_split": None}
    merged = zs.read_config(zs.builtin_yaml("arc_challenge"))  # follows include: arc_easy.yaml
    assert merged["dataset_name"] == "ARC-Challenge" and merged["test_split"] == "test"
    assert zs.read_config(zs.builtin_yaml("hellaswag"))["process_docs"] is None  # a !function tag, not resolved
    hub = zs.TaskSource("rte", "hub", "nyu-mll/glue rte", "validation")
    assert zs.task_yaml("rte", hub) == {"include": str(zs.builtin_yaml("rte")), "task": "rte", "num_fewshot": 0}


def test_only_public_lm_eval_names_are_used() -> None:
    """No private lm-eval module or name, no HFLM subclass, no tqdm patching in crepe.zeroshot."""
    folder = Path(zs.__file__).parent
    for path in sorted(folder.glob("*.py")):
        text = path.read_text()
        assert not re.search(r"lm_eval(\.\w+)*\._(?!_)", text), path.name  # dunders (__file__) are public
        for line in re.findall(r"from lm_eval[\w.]* import [^\n]+", text):
            assert not re.search(r"import .*\b_\w", line), (path.name, line)
        assert not re.search(r"import tqdm|from tqdm|\.tqdm\b", text) and "(HFLM)" not in text, path.name
    import lm_eval.api.model

    from crepe.zeroshot.scorer import PackedLM

    assert issubclass(PackedLM, lm_eval.api.model.LM) and PackedLM.__mro__[1] is lm_eval.api.model.LM


def test_source_overrides_touch_only_data_location(tmp_path) -> None:
    src = zs.TaskSource("arc_easy", "local", str(tmp_path / "arc" / "ARC-Easy-test.jsonl"), "test")
    cfg = {"training_split": "train", "validation_split": "validation", "test_split": "test"}
    assert zs.source_overrides("arc_easy", src, cfg) == {
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": src.path}},
        "training_split": None,
        "validation_split": None,
    }
    rte = zs.TaskSource("rte", "local", "/d/rte/glue_rte_validation.parquet", "validation")
    over = zs.source_overrides("rte", rte, {"training_split": "train", "validation_split": "validation"})
    assert over["dataset_path"] == "parquet" and over["training_split"] is None and "validation_split" not in over


@needs_data
def test_truncated_local_file_is_refused(tmp_path) -> None:
    lines = (DATA / "boolq" / "super_glue_boolq_validation.jsonl").read_text().splitlines()[:10]
    (tmp_path / "boolq").mkdir()
    (tmp_path / "boolq" / "super_glue_boolq_validation.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(CrepeError, match="holds 10 boolq documents, the official validation split has 3270"):
        zs.build_tasks(["boolq"], zs.resolve_sources(["boolq"], tmp_path))


# --- prompts equal lm-eval's built-in rendering ---------------------------------------------------

# Hand-checked against the lm-eval 0.4.13 YAMLs and the first record of each file.
GOLDEN = {
    "boolq": ("Ethanol fuel -- All biomass goes through", "\nQuestion: does ethanol take more energy make that produces?"
              "\nAnswer:", [" no", " yes"], 0),
    "rte": ("Dana Reeve, the widow of the actor Christopher Reeve,", "\nQuestion: Christopher Reeve had an accident. "
            "True or False?\nAnswer:", [" True", " False"], 1),
    "mnli": ("The new rights are nice enough\nQuestion: Everyone really likes the newest benefits. True, False or "
             "Neither?\nAnswer:", "", [" True", " Neither", " False"], 1),
    "hellaswag": ("Roof shingle removal: A man is sitting on a roof. He", "",
                  [" is using wrap to wrap a pair of skis.", " is ripping level tiles off.", " is holding a rubik's cube.",
                   " starts pulling up roofing on a roof."], 3),
    "arc_easy": ("Question: Which statement best explains why photosynthesis is the foundation of most food webs?"
                 "\nAnswer:", "", [" Sunlight is the source of energy for nearly all ecosystems.",
                                   " Most ecosystems are found on land instead of in water.",
                                   " Carbon dioxide is more available than other gases.",
                                   " The producers in all ecosystems are plants."], 0),
    "arc_challenge": ("Question: An astronomer observes that a planet rotates faster after a meteorite impact.", "",
                      [" Planetary density will decrease.", " Planetary years will become longer.",
                       " Planetary days will become shorter.", " Planetary gravity will become stronger."], 2),
}


@needs_data
@pytest.mark.parametrize("name", list(zs.TASKS))
def test_first_document_prompt_equals_builtin_task(name, local_tasks, monkeypatch) -> None:
    import datasets
    from lm_eval.tasks import TaskManager

    ours = local_tasks[name]
    record = _first_record(DATA / zs.TASK_DATA[name].local_file)
    calls = []

    def fake_hub(path, name=None, **kwargs):  # the built-in task's download, fed the same raw record
        calls.append((path, name))
        return datasets.DatasetDict({s: datasets.Dataset.from_list([record]) for s in ("train", "validation",
                                     "validation_matched", "test")})

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    manager = TaskManager(include_path=str(zs.builtin_yaml(name).parent), include_defaults=False)
    with zs.quiet_lm_eval():
        builtin = manager.load([name])["tasks"][name]
    assert calls and " ".join(filter(None, calls[0])) == zs.TASK_DATA[name].hub  # really the hub config
    ours_doc, builtin_doc = ours.eval_docs[0], builtin.eval_docs[0]
    assert ours.doc_to_text(ours_doc) == builtin.doc_to_text(builtin_doc)
    assert ours.doc_to_choice(ours_doc) == builtin.doc_to_choice(builtin_doc)
    assert ours.doc_to_target(ours_doc) == builtin.doc_to_target(builtin_doc)
    # only data-location keys were overridden: prompt, choices, target and metrics are lm-eval's
    for key in ("doc_to_text", "doc_to_choice", "doc_to_target", "output_type", "process_docs", "metric_list"):
        mine, theirs = getattr(ours.config, key), getattr(builtin.config, key)
        if callable(theirs):  # !function entries: the same function from lm-eval's utils.py
            assert mine.__code__ == theirs.__code__ and mine.__module__ == theirs.__module__, (name, key)
        else:
            assert mine == theirs, (name, key)
    builtin.set_config(key="num_fewshot", value=0)
    ours_reqs, builtin_reqs = _requests(ours), _requests(builtin)
    assert ours_reqs == builtin_reqs
    start, end, choices, target = GOLDEN[name]
    context = ours_reqs[0][0]
    assert context.startswith(start) and context.endswith(end)
    assert [c for _, c in ours_reqs] == choices
    assert ours.doc_to_target(ours_doc) == target


# --- running -------------------------------------------------------------------------------------


@needs_data
def test_tiny_model_limit_8_completes_with_metrics_in_unit_interval(tiny_lm) -> None:
    pad_before = tiny_lm.tokenizer.pad_token
    rng = torch.get_rng_state()
    result = zs.run_zero_shot(tiny_lm.model, tiny_lm.tokenizer, limit=8, batch_size=4)
    assert torch.equal(torch.get_rng_state(), rng)  # lm-eval did not reseed the caller's generators
    assert list(result["tasks"]) == list(zs.TASKS) and result["all_six"]
    for name, t in result["tasks"].items():
        assert 0.0 <= t["acc"] <= 1.0 and t["n"] == 8 and t["n_total"] == zs.TASK_DATA[name].official_count
        assert (t["acc_norm"] is not None) == (name in ("hellaswag", "arc_easy", "arc_challenge"))
        if t["acc_norm"] is not None:
            assert 0.0 <= t["acc_norm"] <= 1.0
        assert t["acc"] * 8 == pytest.approx(round(t["acc"] * 8))  # a count out of 8 documents
        assert t["source"]["kind"] == "local" and len(t["source"]["sha256"]) == 64
        assert t["version"] is not None
    assert result["average_acc"] == pytest.approx(sum(t["acc"] for t in result["tasks"].values()) / 6)
    assert result["num_fewshot"] == 0 and result["limit"] == 8
    import lm_eval

    assert result["lm_eval_version"] == lm_eval.__version__
    thr = result["throughput"]
    assert thr["requests"] == 8 * (2 + 2 + 3 + 4) + sum(
        len(d["choices"]["text"]) for d in _arc_docs(8))
    assert 0 < thr["tokens"] < thr["request_tokens"]  # packing fed fewer tokens than lm-eval would
    assert tiny_lm.tokenizer.pad_token == pad_before  # the tokenizer was not changed
    assert result["scorer"] == "packed" and result["packed_contexts"] is True
    table = format_zero_shot_table(result)
    assert table.count("\n") == 2 + 6 and "| boolq | 8 of 3270 |" in table and "average acc (6 tasks)" in table
    metrics = zero_shot_metrics(result)
    assert metrics["zeroshot/avg_acc"] == result["average_acc"] and "zeroshot/boolq/acc_norm" not in metrics


def _arc_docs(limit: int) -> list[dict]:
    docs = []
    for split in ("ARC-Easy-test.jsonl", "ARC-Challenge-test.jsonl"):
        with open(DATA / "arc" / split) as fh:
            docs += [json.loads(next(fh)) for _ in range(limit)]
    return docs


@needs_data
def test_in_memory_equals_saved_and_reloaded(tiny_dir, tmp_path) -> None:
    from crepe.models import load_model
    from crepe.pruner import PruneConfig, prune_model
    from crepe.types import parse_sparsity

    lm = load_model(str(tiny_dir), device="cpu")
    calib = torch.randint(2, len(lm.tokenizer), (4, 16), generator=torch.Generator().manual_seed(0))
    prune_model(lm.model, calib, PruneConfig("wanda", parse_sparsity("2:4")))
    live = zs.run_zero_shot(lm.model, lm.tokenizer, limit=6)
    lm.model.save_pretrained(tmp_path / "saved")
    lm.tokenizer.save_pretrained(tmp_path / "saved")
    again = load_model(str(tmp_path / "saved"), device="cpu")
    reloaded = zs.run_zero_shot(again.model, again.tokenizer, limit=6)
    assert live["tasks"] == reloaded["tasks"] and live["average_acc"] == reloaded["average_acc"]
    # per-request log-likelihoods too, bit for bit
    tasks = zs.build_tasks(["hellaswag", "boolq"], zs.resolve_sources(["hellaswag", "boolq"]))
    reqs = [inst for t in tasks.values() for inst in (_requests_limit(t, 6))]
    a = zs.live_hflm(lm.model, lm.tokenizer).loglikelihood(reqs)
    b = zs.live_hflm(again.model, again.tokenizer).loglikelihood(reqs)
    assert a == b


def _requests_limit(task, limit: int) -> list:
    with zs.quiet_lm_eval():
        task.build_all_requests(limit=limit)
    return list(task.instances)


@needs_data
def test_live_wrapper_equals_stock_hflm(tiny_lm) -> None:
    """pack=False: bit for bit equal to lm-eval's own HFLM; packed: equal up to float rounding."""
    tasks = zs.build_tasks(list(zs.TASKS), zs.resolve_sources(list(zs.TASKS)))
    reqs = [inst for t in tasks.values() for inst in _requests_limit(t, 5)]
    stock = stock_hflm(tiny_lm.model, tiny_lm.tokenizer, 4)
    expected = stock.loglikelihood(reqs, disable_tqdm=True)
    rows = zs.live_hflm(tiny_lm.model, tiny_lm.tokenizer, 4, pack=False)
    assert rows.loglikelihood(reqs) == expected
    packed = zs.live_hflm(tiny_lm.model, tiny_lm.tokenizer, 4, pack=True)
    got = packed.loglikelihood(reqs)
    assert packed.stats.packed_rows > 0 and packed.stats.tokens < rows.stats.tokens
    for (a, ga), (b, gb) in zip(got, expected, strict=True):
        assert a == pytest.approx(b, abs=1e-4)


def test_rolling_loglikelihood_equals_stock_hflm_and_generation_is_refused() -> None:
    """``loglikelihood_rolling`` windows a long string as HFLM does (max_length 8 forces several windows)."""
    from lm_eval.api.instance import Instance

    model, tok = build("llama", attn="eager"), word_tokenizer()
    text = ["alpha beta gamma delta alpha beta gamma delta alpha beta gamma delta alpha", "beta gamma"]
    reqs = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(text)]
    expected = stock_hflm(model, tok, 2, max_length=8).loglikelihood_rolling(reqs, disable_tqdm=True)
    got = zs.live_hflm(model, tok, 2, max_length=8).loglikelihood_rolling(reqs)
    assert len(got) == 2 and got[0] < got[1] < 0
    assert got == pytest.approx(expected, abs=1e-4)
    with pytest.raises(NotImplementedError, match="log-likelihoods only"):
        zs.live_hflm(model, tok).generate_until([Instance("generate_until", {}, ("x", {}), 0)])


@needs_data
def test_stock_hflm_mode_gives_the_same_accuracies(tiny_lm) -> None:
    """``pack=False`` runs lm-eval's own HFLM through simple_evaluate; accuracies equal the packed scorer's."""
    packed = zs.run_zero_shot(tiny_lm.model, tiny_lm.tokenizer, "rte,hellaswag", limit=4, batch_size=4)
    stock = zs.run_zero_shot(tiny_lm.model, tiny_lm.tokenizer, "rte,hellaswag", limit=4, batch_size=4, pack=False)
    assert stock["scorer"] == "hflm" and stock["packed_contexts"] is False and stock["throughput"]["tokens"] is None
    for name in ("rte", "hellaswag"):
        for key in ("acc", "acc_norm", "n", "n_total", "version"):
            assert packed["tasks"][name][key] == stock["tasks"][name][key], (name, key)


def test_comparison_table_one_row_per_method_and_blank_cells_for_missing_metrics() -> None:
    from tasks.zeroshot import format_zero_shot_comparison

    def result(accs, norms):
        return {"tasks": {n: {"acc": a, "acc_norm": m} for n, a, m in zip(("boolq", "hellaswag"), accs, norms)}}

    rows = [{"method": "dense", "pattern": "-", "zero_shot": result([0.5, 0.25], [None, 0.3])},
            {"method": "wanda", "pattern": "2:4", "zero_shot": result([0.625, 0.125], [None, 0.2])}]
    assert format_zero_shot_comparison(rows).splitlines() == [
        "| method | pattern | BoolQ | HellaSwag | avg |", "|---|---|---:|---:|---:|",
        "| dense | - | 50.00 | 25.00 | 37.50 |", "| wanda | 2:4 | 62.50 | 12.50 | 37.50 |"]
    assert format_zero_shot_comparison(rows, "acc_norm").splitlines()[2] == "| dense | - |  | 30.00 |  |"
    assert format_zero_shot_comparison([]) == ""


def test_bad_input() -> None:
    with pytest.raises(CrepeError) as err:
        zs.parse_tasks("boolq,winogrande")
    assert "'winogrande'" in str(err.value)
    for name in zs.TASKS:
        assert name in str(err.value)
    with pytest.raises(CrepeError, match="no zero-shot task"):
        zs.parse_tasks(" , ")
    assert zs.parse_tasks("all") == list(zs.TASKS) == zs.parse_tasks(None)
    assert zs.parse_tasks("ARC_Easy, boolq,arc_easy") == ["arc_easy", "boolq"]
    for bad in (0, -3, 1.5, True, "8"):
        with pytest.raises(CrepeError, match="limit must be a positive integer"):
            zs.run_zero_shot(None, None, ["rte"], limit=bad)
    with pytest.raises(CrepeError, match="batch size must be a positive integer"):
        zs.run_zero_shot(None, None, ["rte"], batch_size=0)
    with pytest.raises(CrepeError, match="does not exist"):
        zs.run_zero_shot(None, None, ["rte"], data_dir="/nonexistent/zs-data")


# --- row packing: golden cases and a property against a one-request-at-a-time reference -------------


def test_plan_rows_golden() -> None:
    reqs = [
        (None, [5, 6, 7], [8]),  # A: one-token answers share the last context position
        (None, [5, 6, 7], [9]),  # B
        (None, [5, 6, 7], [10, 11, 12]),  # C: its segment holds 10, 11 (12 is only predicted)
        (None, [1, 2], [3, 4]),  # D: alone, a plain causal row
    ]
    packed = zs.plan_rows(reqs, max_length=100, pack_limit=100)
    assert [(r.tokens, r.positions, r.segment) for r in packed] == [
        ([5, 6, 7, 10, 11], [0, 1, 2, 3, 4], [0, 0, 0, 2, 2]),
        ([1, 2, 3], [0, 1, 2], None),
    ]
    assert packed[0].scores == [(0, [8], [2]), (1, [9], [2]), (2, [10, 11, 12], [2, 3, 4])]
    assert packed[1].scores == [(3, [3, 4], [1, 2])]
    # lm-eval's rows: (context + continuation)[:-1], shared when identical; longest first
    plain = zs.plan_rows(reqs, max_length=100, pack_limit=None)
    assert [(r.tokens, r.scores) for r in plain] == [
        ([5, 6, 7, 10, 11], [(2, [10, 11, 12], [2, 3, 4])]),
        ([1, 2, 3], [(3, [3, 4], [1, 2])]),
        ([5, 6, 7], [(0, [8], [2]), (1, [9], [2])]),
    ]
    # left truncation to max_length, as lm-eval: (5, 6, 7, 10, 11, 12)[-4:][:-1]
    short = zs.plan_rows(reqs, max_length=3, pack_limit=None)
    assert ([7, 10, 11], [(2, [10, 11, 12], [0, 1, 2])]) in [(r.tokens, r.scores) for r in short]


def test_batch_rows_mask_and_kept_positions() -> None:
    rows = zs.plan_rows([(None, [5, 6], [7, 8]), (None, [5, 6], [9, 1, 2])], 100, 100)
    (row,) = rows
    assert row.tokens == [5, 6, 7, 9, 1] and row.segment == [0, 0, 1, 2, 2] and row.positions == [0, 1, 2, 2, 3]
    batch = zs.batch_rows(rows + zs.plan_rows([(None, [3], [4])], 100, 100), torch.device("cpu"), torch.float32)
    allowed = batch["attention_mask"][0, 0] == 0
    expected = torch.tensor([
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],  # 7 sees the context and itself
        [1, 1, 0, 1, 0],  # 9 does not see 7
        [1, 1, 0, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(allowed, expected)
    # the 1-token row sees itself, and so does every padding position after it
    assert torch.equal(batch["attention_mask"][1, 0] == 0, torch.eye(5, dtype=torch.bool))
    assert batch["keep"].tolist() == [[1, 2, 3, 4], [0, 1, 2, 3]]  # from each row's first scored position
    assert batch["input_ids"].tolist() == [[5, 6, 7, 9, 1], [3, 0, 0, 0, 0]]


def _reference(model, requests, max_length: int) -> list[float]:
    """One request at a time, no padding, no mask: sum of log p(continuation | context)."""
    out = []
    with torch.no_grad():
        for _, ctx, cont in requests:
            inp = (ctx + cont)[-(max_length + 1):][:-1]
            logits = model(torch.tensor([inp]), use_cache=False).logits[0].float()
            lp = torch.log_softmax(logits, dim=-1)[-len(cont):]
            out.append(float(lp.gather(1, torch.tensor(cont)[:, None]).sum()))
    return out


@st.composite
def request_sets(draw):
    reqs = []
    for _ in range(draw(st.integers(1, 5))):
        ctx = draw(st.lists(st.integers(3, VOCAB - 1), min_size=1, max_size=9))
        for _ in range(draw(st.integers(1, 4))):
            reqs.append((None, ctx, draw(st.lists(st.integers(3, VOCAB - 1), min_size=1, max_size=4))))
    return reqs


_WRAPPERS: dict = {}


def _wrapper(arch: str, attn: str, pack: bool, max_length: int):
    key = (arch, attn, pack, max_length)
    if key not in _WRAPPERS:
        _WRAPPERS[key] = zs.live_hflm(build(arch, attn=attn), word_tokenizer(), 3, pack=pack, max_length=max_length)
    return _WRAPPERS[key]


@pytest.mark.parametrize("arch,attn", [("llama", "eager"), ("llama", "sdpa"), ("mistral", "eager"),
                                       ("qwen3", "sdpa"), ("gemma3", "eager")])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reqs=request_sets(), pack=st.booleans(), max_length=st.sampled_from([64, 8]))
def test_scores_equal_reference_loop(arch, attn, reqs, pack, max_length) -> None:
    lm = _wrapper(arch, attn, pack, max_length)
    got = lm.loglikelihood_tokens(reqs)
    expected = _reference(lm.model, reqs, max_length)
    for (value, greedy), ref in zip(got, expected, strict=True):
        assert math.isfinite(value) and value == pytest.approx(ref, abs=2e-4)


# --- front ends: CLI, jobs, the Prefect task and MLflow ----------------------------------------------


def _cli(argv, capsys):
    from flows.cli import main

    try:
        code = main(["--no-progress", *argv])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


@needs_data
def test_cli_eval_zero_shot_prints_table_and_writes_json(tiny_dir, tmp_path, capsys) -> None:
    target = tmp_path / "zs.json"
    code, out, err = _cli(["eval", "--model", str(tiny_dir), "--zero-shot", "rte,arc_easy", "--limit", "3",
                           "--batch-size", "2", "--json", str(target)], capsys)
    assert code == 0, err
    assert "| rte | 3 of 277 |" in out and "| arc_easy | 3 of 2376 |" in out and "average acc (2 tasks)" in out
    assert "first 3 documents of each task" in out and "perplexity" not in out
    result = json.loads(target.read_text())
    zs_result = result["zero_shot"]
    assert zs_result["batch_size"] == 2 and zs_result["limit"] == 3 and zs_result["packed_contexts"] is True
    assert set(zs_result["tasks"]) == {"rte", "arc_easy"} and zs_result["average_acc"] is not None
    assert result["model"]["path"] == str(tiny_dir) and result["versions"]["torch"]


@pytest.mark.parametrize("argv,message", [
    (["--zero-shot", "boolq,piqa"], "unknown zero-shot task 'piqa'; allowed: boolq, rte, mnli, hellaswag, arc_easy, arc_challenge"),
    (["--zero-shot", "rte", "--limit", "0"], "argument --limit: '0' must be a positive integer"),
    (["--limit", "5"], "--limit applies to zero-shot evaluation"),
    (["--zero-shot", "rte", "--data-dir", "/nonexistent/zs"], "data directory /nonexistent/zs does not exist"),
])
def test_cli_eval_zero_shot_bad_input(tiny_dir, argv, message, capsys) -> None:
    code, out, err = _cli(["eval", "--model", str(tiny_dir), *argv], capsys)
    assert code == 2
    assert message in err and "Traceback" not in err


@needs_data
def test_zero_shot_metrics_reach_a_real_mlflow_store(tiny_lm, tmp_path) -> None:
    """The pipeline's evaluate result goes to MLflow through the track task's own path: run_metrics flattens
    it and the Tracker logs it with MLflow's log_batch (a real sqlite store)."""
    from tasks.publish import run_metrics
    from tasks.tracking import open_tracker

    result = zs.run_zero_shot(tiny_lm.model, tiny_lm.tokenizer, ["boolq", "hellaswag"], limit=2)
    metrics = run_metrics({"ppl": {"split": "test", "ppl": 12.5}, "zero_shot": result}, None)
    tracker = open_tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path)
    with tracker.pipeline_run("tiny", "zero-shot", {"eval": {"zero_shot": {"limit": 2}}}, kind="pipeline") as ref:
        tracker.log_metrics(ref, metrics)
    logged = tracker.client.get_run(ref.run_id).data.metrics
    assert logged["zero_shot/boolq/acc"] == result["tasks"]["boolq"]["acc"]
    assert logged["zero_shot/hellaswag/acc_norm"] == result["tasks"]["hellaswag"]["acc_norm"]
    assert logged["zero_shot/avg_acc"] == result["average_acc"] and logged["zero_shot/boolq/n"] == 2
    assert "zero_shot/boolq/acc_norm" not in logged and logged["ppl/test"] == 12.5


@needs_data
def test_results_command_writes_report(tiny_dir, tmp_path, capsys) -> None:
    from flows.zeroshot_table import main as table_main

    pho = tmp_path / "pho.json"
    pho.write_text(json.dumps({"winner": {"params": {"alpha": 0.5, "beta": 2.0, "gamma": 0.1, "kernel_size": 3}}}))
    out, raw = tmp_path / "zs.md", tmp_path / "zs.json"
    code = table_main(["--model", str(tiny_dir), "--methods", "dense,wanda,crepe", "--limit", "1",
                       "--calib-samples", "2", "--seqlen", "16", "--calib-source", "pydoc",
                       "--crepe-params", f"2:4={pho}", "--out", str(out), "--json", str(raw), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    result = json.loads(raw.read_text())
    labels = [(r["method"], r["pattern"]) for r in result["rows"]]
    assert labels == [("dense", "-"), ("wanda", "50%"), ("crepe", "50%"), ("wanda", "2:4"), ("crepe", "2:4")]
    crepe24 = result["rows"][-1]
    assert crepe24["params"]["alpha"] == 0.5 and crepe24["params"]["kernel_size"] == 3
    assert "PHO result" in crepe24["params_from"] and result["rows"][2]["params_from"].startswith("documented")
    assert all(r["zero_shot"]["tasks"]["boolq"]["n"] == 1 for r in result["rows"])
    assert all(r["sparsity"] == pytest.approx(0.5) for r in result["rows"][1:])
    text = out.read_text()
    assert "| method | pattern | BoolQ | RTE | MNLI | HellaSwag | ARC-e | ARC-c | avg |" in text
    assert text.count("| crepe | 2:4 |") == 3 and "## Data files" in text


def test_results_command_bad_input(tmp_path, capsys) -> None:
    from flows.zeroshot_table import main as table_main

    assert table_main(["--tasks", "boolq,squad", "--out", str(tmp_path / "x.md")]) == 2
    assert "unknown zero-shot task 'squad'" in capsys.readouterr().err
    pho = tmp_path / "p.json"
    pho.write_text(json.dumps({"alpha": 1.0}))
    assert table_main(["--crepe-params", f"4:8={pho}", "--out", str(tmp_path / "x.md")]) == 2
    assert "not in --patterns" in capsys.readouterr().err
    assert not (tmp_path / "x.md").exists()
