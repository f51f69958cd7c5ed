"""params.yaml validation (issue 4 §1): every error class names the dotted path, the value and what is
allowed, with file:line:column or the -S override; overrides; stable section hashes; both profiles."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crepe.allocation import ALLOCATORS
from crepe.methods import all_methods
from crepe.refine import REFINES
from tasks.config import (
    SECTIONS,
    ConfigError,
    PipelineConfig,
    load_config,
    model_slug,
    parse_yaml,
    pattern_slug,
    project_root_of,
)

REPO = Path(__file__).resolve().parent.parent
PARAMS = REPO / "params.yaml"
PAPER = REPO / "profiles" / "paper.yaml"


def write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path, overrides=()) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return info.value


def override_error(*overrides: str) -> str:
    return str(error_of(PARAMS, overrides))


# --- profiles ----------------------------------------------------------------------------------------


def test_params_yaml_is_the_builtin_default_cpu_profile():
    cfg = load_config(PARAMS)
    assert cfg == PipelineConfig.from_mapping({})  # the code's defaults document the shipped file
    assert cfg.to_dict() == load_config(None).to_dict()
    assert cfg.model.spec == "embedded:smollm2-135m" and cfg.model.dtype == "float32"
    assert (cfg.calibration.samples, cfg.calibration.seqlen) == (16, 256)
    assert cfg.eval.ppl.max_windows == 16
    assert (cfg.pho.n_trials, cfg.pho.top_k, cfg.pho.sampler) == (20, 3, "cmaes")
    assert cfg.refine.method == "none" and cfg.allocation.method == "none"
    assert cfg.eval.zero_shot.tasks == []
    assert cfg.source == str(PARAMS) and cfg.project_root == REPO


def test_paper_profile_holds_the_papers_settings():
    cfg = load_config(PAPER)
    assert cfg.model.dtype == "float16"
    assert (cfg.calibration.samples, cfg.calibration.seqlen, cfg.calibration.seed) == (128, 2048, 0)
    assert cfg.data.calib_source == "c4" and cfg.data.eval_source == "wikitext2"
    assert (cfg.pho.n_trials, cfg.pho.top_k, cfg.pho.sampler, cfg.pho.target) == (60, 10, "cmaes", "self_attn.q_proj")
    assert cfg.prune.params["kernel_size"] == 9 and cfg.prune.params["a"] == 0.5
    assert (cfg.eval.ppl.seqlen, cfg.eval.ppl.max_windows, cfg.eval.ppl.split) == (2048, None, "test")
    assert cfg.eval.zero_shot.tasks == ["boolq", "rte", "mnli", "hellaswag", "arc_easy", "arc_challenge"]
    # profiles/ lives inside the project: it shares the project's MLflow store and data/
    assert cfg.project_root == REPO
    assert cfg.tracking_uri() == f"sqlite:///{REPO.as_posix()}/mlflow.db"
    assert cfg.experiment_name() == "crepe-meta-llama-Llama-2-7b-hf"


def test_params_yaml_spells_out_every_key():
    """The shipped file documents every knob: its keys are exactly the schema's (DVC reads it too)."""
    data, _ = parse_yaml(PARAMS.read_text())

    def keys(node, prefix=""):
        out = set()
        for k, v in node.items():
            path = f"{prefix}{k}"
            out.add(path)
            if isinstance(v, dict) and k != "params":
                out |= keys(v, path + ".")
        return out

    schema = keys({k: v for k, v in PipelineConfig.from_mapping({}).to_dict().items()})
    schema = {k for k in schema if not k.startswith(("prune.params.", "refine.params.", "allocation.params."))}
    assert keys(data) == schema
    paper, _ = parse_yaml(PAPER.read_text())
    assert keys(paper) - {"prune.params.kernel_size", "prune.params.a"} == schema


# --- YAML reading ------------------------------------------------------------------------------------


def test_yaml_1_2_scalars(tmp_path):
    """2:4 stays a pattern (YAML 1.1 reads the integer 124), 1e-3 is a float, yes is not a boolean."""
    cfg = load_config(write(tmp_path, "prune:\n  sparsity: 2:4\n  params: {gamma: 1e-3, kernel_size: 011}\n"))
    assert cfg.prune.sparsity == "2:4"
    assert cfg.prune.params["gamma"] == 0.001 and cfg.prune.params["kernel_size"] == 11
    err = error_of(write(tmp_path, "pho:\n  enabled: yes\n"))
    assert str(err) == f"{tmp_path / 'p.yaml'}:2:3: pho.enabled = 'yes' (string) must be true or false " \
                       "(search CRePE's coefficients before the final prune)"


@pytest.mark.parametrize(
    ("text", "line_col", "words"),
    [
        ("model:\n  spec: x\n dtype: 3\n", "3:2", "expected <block end>"),
        ("a: [1, 2\n", "2:1", "expected ',' or ']'"),
        ('x: "\\q"\n', "1:6", "unknown escape character"),
        ("prune:\n  method: ria\n  method: crepe\n", "3:3", "duplicate key 'method' (first at line 2)"),
        ("prune:\n\tmethod: ria\n", "2:1", "found character '\\t'"),
    ],
)
def test_malformed_yaml_reports_line_and_column(tmp_path, text, line_col, words):
    path = write(tmp_path, text)
    message = str(error_of(path))
    assert message.startswith(f"{path}:{line_col}: malformed YAML: ")
    assert words in message


def test_non_string_keys(tmp_path):
    path = write(tmp_path, "prune:\n  params:\n    1: 2\n")
    assert str(error_of(path)) == f"{path}:2:3: key 1 (integer) under 'prune.params' must be a string; quote it or use a name"
    assert str(error_of(write(tmp_path, "true: 1\n"))).endswith("key True (boolean) under the top level must be a string; "
                                                                 "quote it or use a name")


def test_missing_file_and_non_mapping(tmp_path):
    assert "does not exist" in str(error_of(tmp_path / "nope.yaml"))
    message = str(error_of(write(tmp_path, "- a\n- b\n")))
    assert message.endswith("must be a mapping of sections (model, data, calibration, prune, pho, refine, "
                            "allocation, eval, tracking, runner, release), not a list")


def test_from_mapping_without_a_file():
    cfg = PipelineConfig.from_mapping({"prune": {"sparsity": 0.5}}, ["pho.n_trials=30"])
    assert cfg.prune.sparsity == "0.5" and cfg.pho.n_trials == 30 and cfg.source is None
    with pytest.raises(ConfigError) as info:
        PipelineConfig.from_mapping({"prune": {"sparsty": 0.5}})
    assert str(info.value).startswith("unknown key 'prune.sparsty'")  # no file position to give


def test_empty_file_and_empty_sections_mean_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == PipelineConfig.from_mapping({})
    assert load_config(write(tmp_path, "# only comments\nprune:\n  # method: ria\neval:\n  ppl:\n")) == \
        PipelineConfig.from_mapping({})


def test_partial_file_keeps_other_defaults(tmp_path):
    cfg = load_config(write(tmp_path, "calibration:\n  samples: 4\n"))
    assert cfg.calibration.samples == 4 and cfg.calibration.seqlen == 256 and cfg.pho.n_trials == 20


# --- unknown keys ------------------------------------------------------------------------------------


def test_unknown_key_names_full_path_allowed_keys_and_position(tmp_path):
    path = write(tmp_path, "model:\n  spec: embedded:smollm2-135m\nprune:\n  method: crepe\n  sparsty: 0.5\n")
    assert str(error_of(path)) == (
        f"{path}:5:3: unknown key 'prune.sparsty'; allowed keys of 'prune': method, sparsity, group, rule, "
        "params, targets, ignore, prune_router, moe_min_tokens, moe_fallback, update, update_params (did you mean 'sparsity'?)"
    )


def test_unknown_nested_and_top_level_keys(tmp_path):
    path = write(tmp_path, "pho:\n  bounds:\n    gama: [0, 1]\n")
    assert str(error_of(path)) == (f"{path}:3:5: unknown key 'pho.bounds.gama'; allowed keys of 'pho.bounds': "
                                   "alpha, beta, log10_gamma")
    path = write(tmp_path, "modle:\n  spec: x\n")
    assert str(error_of(path)) == (f"{path}:1:1: unknown key 'modle'; allowed keys (sections): "
                                   f"{', '.join(SECTIONS)} (did you mean 'model'?)")
    message = str(error_of(write(tmp_path, "eval:\n  zero_shot:\n    task: [boolq]\n")))
    assert "3:5: unknown key 'eval.zero_shot.task'" in message and "(did you mean 'tasks'?)" in message


def test_unknown_method_parameter_names_the_methods_parameters(tmp_path):
    path = write(tmp_path, "prune:\n  params:\n    alpah: 0.5\n")
    assert str(error_of(path)) == (f"{path}:3:5: unknown key 'prune.params.alpah': method 'crepe' has "
                                   "parameters: alpha, beta, gamma, kernel_size, a, neighborhood (did you mean 'alpha'?)")
    message = str(error_of(write(tmp_path, "prune:\n  method: magnitude\n  params: {a: 0.5}\npho: {enabled: false}\n")))
    assert "unknown key 'prune.params.a': method 'magnitude' has parameters: none" in message


def test_several_problems_are_counted(tmp_path):
    message = str(error_of(write(tmp_path, "calibration:\n  samples: x\n  seqlen: y\n  seed: z\n")))
    assert message.endswith("calibration.samples = 'x' (string) must be an integer (calibration windows) "
                            "(and 2 more problems)")


# --- wrong types and ranges ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("calibration.samples=abc", "calibration.samples = 'abc' (string) must be an integer (calibration windows)"),
        ("calibration.samples=16.0", "calibration.samples = 16.0 (number) must be an integer (calibration windows)"),
        ("calibration.samples=true", "calibration.samples = True (boolean) must be an integer (calibration windows)"),
        ("eval.ppl.max_windows=x", "eval.ppl.max_windows = 'x' (string) must be an integer or null "
                                   "(first N windows (null: the whole split))"),
        ("prune.sparsity=true", "prune.sparsity = True (boolean) must be a string (a fraction in [0, 1) such as "
                                '0.5, or N:M such as "2:4")'),
        ("eval.zero_shot.tasks=boolq", "eval.zero_shot.tasks = 'boolq' (string) must be a list"),
        ("eval.ppl=3", "eval.ppl = 3 must be a section with keys: split, seqlen, max_windows, batch_size"),
        ("pho.bounds.alpha=[1]", "pho.bounds.alpha = [1]: [1] is not a [low, high] pair"),
        ("pho.bounds.alpha=x", "pho.bounds.alpha = 'x' (string) must be a [low, high] pair"),
        ("model.dtype=fp32", "model.dtype = 'fp32' is not allowed; allowed: float32, bfloat16, float16"),
        ("data.calib_source=c5", "data.calib_source = 'c5' is not allowed; allowed: auto, c4, c4-local, c4-hub, pydoc"),
        ("runner.backend=dusk", "runner.backend = 'dusk' is not allowed; allowed: thread, dask (did you mean 'dask'?)"),
        ("prune.group=rows", "prune.group = 'rows' is not allowed; allowed: row, layer or null (did you mean 'row'?)"),
        ("calibration.samples=0", "calibration.samples = 0 must be >= 1"),
        ("calibration.seqlen=1", "calibration.seqlen = 1 must be >= 2"),
        ("pho.n_trials=1", "pho.n_trials = 1 must be >= 2"),
        ("calibration.seed=-1", "calibration.seed = -1 must be >= 0"),
        ("prune.params.kernel_size=9.0", "prune.params.kernel_size = 9.0 (number) must be an integer"),
        ("prune.params.alpha=x", "prune.params.alpha = 'x' (string) must be a number"),
    ],
)
def test_wrong_types_and_ranges_name_path_value_and_expected(override, expected):
    assert override_error(override) == f"-S {override}: {expected}"


def test_type_error_in_file_points_at_the_key(tmp_path):
    path = write(tmp_path, "eval:\n  zero_shot:\n    tasks: [boolq, 3]\n")
    assert str(error_of(path)) == f"{path}:3:20: eval.zero_shot.tasks[1] = 3 (integer) must be a string"


# --- impossible combinations and registry names ---------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["prune.group=row"], "-S prune.group=row: prune.group = 'row' cannot be combined with the N:M pattern 2:4 "
                              "(N:M selects within groups of M inputs); set prune.group: null"),
        (["prune.rule=threshold"], "-S prune.rule=threshold: prune.rule = 'threshold' applies to unstructured "
                                   "sparsity only, not to the N:M pattern 2:4; set prune.rule: exact"),
        (["pho.top_k=30"], "-S pho.top_k=30: pho.top_k = 30 is larger than pho.n_trials = 20; verify at most as "
                           "many candidates as were screened"),
        (["pho.n_trials=2"], "-S pho.n_trials=2: pho.top_k = 3 is larger than pho.n_trials = 2; "
                              "verify at most as many candidates as were screened"),
        (["pho.sampler=cma"], "-S pho.sampler=cma: unknown pho.sampler 'cma'; allowed: cmaes, tpe, random "
                              "(did you mean 'cmaes'?)"),
        (["pho.n_trials=23"], "-S pho.n_trials=23: pho.n_trials: n_trials 23 is smaller than one CMA-ES population: "
                              "it has no divisor between 2 and 7 (the default population for dim 3); use a "
                              "multiple of one of 2..7, e.g. 60"),
        (["prune.sparsity=1.0"], "-S prune.sparsity=1.0: prune.sparsity = 1.0: sparsity 1.0 is outside [0, 1); "
                                 "use a fraction such as 0.5"),
        (["prune.sparsity=-0.1"], "-S prune.sparsity=-0.1: prune.sparsity = -0.1: sparsity -0.1 is outside [0, 1); "
                                  "use a fraction such as 0.5"),
        (["prune.sparsity=3:2"], "-S prune.sparsity=3:2: prune.sparsity = '3:2': invalid N:M pattern 3:2; need "
                                 "integers with 1 <= N < M (N zeros in every M weights), e.g. 2:4 or 4:8"),
        (["prune.method=ria"], "-S prune.method=ria: PHO searches CRePE's coefficients but prune.method is 'ria'; "
                               "set prune.method: crepe or pho.enabled: false"),
        (["prune.method=sparsegtp"], "-S prune.method=sparsegtp: unknown prune.method 'sparsegtp'; known methods: "
                                     "crepe, lp_ria, magnitude, ria, sparsegpt, stoch_ria, sym_weight, "
                                     "wanda (did you mean 'sparsegpt'?)"),
        (["prune.params.alpha=-1"], "-S prune.params.alpha=-1: prune.params: alpha=-1.0 must be a finite number >= 0"),
        (["prune.params.kernel_size=4"], "-S prune.params.kernel_size=4: prune.params: kernel_size 4 is invalid; use "
                                         "an odd integer >= 3 (e.g. 9)"),
        (["pho.bounds.log10_gamma=[0, -5]"], "-S pho.bounds.log10_gamma=[0, -5]: pho.bounds.log10_gamma: log10_gamma "
                                             "bounds (0, -5) are inverted or empty; low must be < high"),
        (["pho.bounds.alpha=[-1, 1]"], "-S pho.bounds.alpha=[-1, 1]: pho.bounds.alpha: alpha lower bound -1 is "
                                       "negative; coefficients must be >= 0"),
        (["pho.target=q proj"], "-S pho.target=q proj: pho.target = 'q proj' is not a dotted module name such as "
                                "self_attn.q_proj"),
        (["refine.method=foo"], "-S refine.method=foo: unknown refine.method 'foo'; allowed: none, cp, lsa, dsnot, "
                                "r2-dsnot"),
        (["refine.method=dsnot", "refine.params.skip=mlp"], "-S refine.params.skip=mlp: unknown key "
                                                             "'refine.params.skip': refine method 'dsnot' has parameters: "
                                                             "max_cycle_time, update_threshold, pow_of_var_regrowing, "
                                                             "same_sign, monotone, skip_layer, order"),
        (["allocation.method=owls", "prune.sparsity=0.5"], "-S allocation.method=owls: unknown allocation.method "
                                                           "'owls'; allowed: none, owl, alpha, dlp (did you mean 'owl'?)"),
        (["refine.params.x=1"], "-S refine.params.x=1: unknown key 'refine.params.x': refine method 'none' has "
                                "parameters: none"),
        (["eval.zero_shot.tasks=[boolq, piqa]"], "-S eval.zero_shot.tasks=[boolq, piqa]: unknown zero-shot task "
                                                 "'piqa'; allowed: boolq, rte, mnli, hellaswag, arc_easy, arc_challenge"),
        (["eval.zero_shot.tasks=[rte, rte]"], "-S eval.zero_shot.tasks=[rte, rte]: zero-shot task 'rte' is listed twice"),
        (["tracking.uri=mlflow.db"], "-S tracking.uri=mlflow.db: tracking.uri = 'mlflow.db' is not a tracking URI; "
                                     "use one of the schemes sqlite://, file://, http://, https://, postgresql://, "
                                     "mysql://, mssql://, databricks:// (default sqlite:///mlflow.db)"),
        (["tracking.experiment=x-{base}"], "-S tracking.experiment=x-{base}: tracking.experiment uses the unknown "
                                           "placeholder {base}; allowed: {model}"),
        (["runner.dask_address=tcp://h:8786"], "-S runner.dask_address=tcp://h:8786: runner.dask_address is set but "
                                               "runner.backend is 'thread'; set runner.backend: dask or "
                                               "runner.dask_address: null"),
        (["runner.backend=dask", "runner.dask_address=localhost"], "-S runner.dask_address=localhost: "
                                                                   "runner.dask_address = 'localhost' is not a scheduler "
                                                                   "address like tcp://127.0.0.1:8786"),
        (["tracking.enabled=false"], "-S tracking.enabled=false: release.register_model needs MLflow but "
                                     "tracking.enabled is false; set release.register_model: false or "
                                     "tracking.enabled: true"),
        (["release.alias=latest"], "-S release.alias=latest: release.alias = 'latest' is not a registry alias; use "
                                   "letters, digits, '-' or '_' (not 'latest' and not v<number>), e.g. candidate or "
                                   "champion"),
        (["release.model_name='{model}-{x}'"], "-S release.model_name='{model}-{x}': release.model_name uses the "
                                               "unknown placeholder {x}; allowed: {model}, {method}, {pattern}"),
        (["model.spec=embedded:smol"], "-S model.spec=embedded:smol: unknown embedded model 'smol'; available: "
                                       "embedded:smollm2-135m, embedded:gemma3-270m"),
        (["model.device=gpu"], "-S model.device=gpu: model.device = 'gpu' is not a device; use auto, cpu, cuda or cuda:N"),
    ],
)
def test_impossible_combinations_and_unknown_names(overrides, expected):
    assert override_error(*overrides) == expected


def test_combination_error_in_file_points_at_the_key(tmp_path):
    path = write(tmp_path, "prune:\n  sparsity: 0.5\n  method: wanda\npho:\n  enabled: true\n")
    assert str(error_of(path)).startswith(f"{path}:5:3: PHO searches CRePE's coefficients but prune.method is 'wanda'")


def test_the_extensions_are_registered_with_the_library_defaults():
    cfg = load_config(PARAMS, ["prune.sparsity=0.7", "allocation.method=owl", "refine.method=dsnot"])
    assert cfg.allocation.params == {"m": 5.0, "lam": 0.08} and cfg.refine.params["skip_layer"] == "mlp"
    config = cfg.prune_config()
    assert (config.refine, config.allocation) == ("dsnot", "owl")
    assert load_config(PARAMS, ["refine.method=lsa"]).prune_config().refine == "lsa"
    assert load_config(PARAMS, ["refine.method=lsa"]).refine.params == {"importance": "sum", "fallback": True, "blocks": 1}


def test_stage_names_come_from_the_library_registries():
    """The allowed names are the library's registries (plus none), in registration order."""
    assert override_error("refine.method=x").endswith(f"allowed: none, {', '.join(REFINES)}")
    assert override_error("prune.sparsity=0.5", "allocation.method=x").endswith(f"allowed: none, {', '.join(ALLOCATORS)}")
    assert override_error("prune.method=xyz").endswith(f"known methods: {', '.join(all_methods())}")
    cfg = load_config(PARAMS, ["prune.method=sparsegpt", "pho.enabled=false", "prune.sparsity=0.5"])
    assert cfg.prune.params == {"blocksize": 128, "percdamp": 0.01, "max_damp_retries": 3} and cfg.prune.group is None
    assert cfg.prune_config().method == "sparsegpt"


def test_a_registry_entry_resolves_its_defaults_and_its_pattern_rules_apply():
    cfg = load_config(PARAMS, ["prune.sparsity=0.5", "allocation.method=owl", "allocation.params.m=3.0"])
    assert cfg.allocation.params == {"m": 3.0, "lam": 0.08}  # defaults resolved, override kept
    assert override_error("allocation.method=owl") == (
        "-S allocation.method=owl: allocation.method 'owl' sets per-layer sparsity ratios and cannot be combined "
        "with the N:M pattern 2:4; use allocation.method: none or an unstructured prune.sparsity such as 0.5")
    assert "with the N:M pattern 4:8" in override_error("prune.sparsity=4:8", "allocation.method=owl")
    assert load_config(PARAMS, ["refine.method=cp"]).refine.method == "cp"
    assert override_error("prune.sparsity=0.5", "refine.method=cp") == (
        "-S refine.method=cp: refine.method 'cp' works on N:M patterns only, but prune.sparsity is the unstructured "
        "0.5; use an N:M pattern such as 2:4")
    assert override_error("prune.sparsity=0.5", "allocation.method=owl", "allocation.params.lambda=1") == (
        "-S allocation.params.lambda=1: unknown key 'allocation.params.lambda': allocation method 'owl' has "
        "parameters: m, lam (did you mean 'lam'?)")


def test_stage_parameter_values_are_checked_by_the_library(tmp_path):
    """A bad value of a refinement or allocation parameter is the library's sentence, at the key's line."""
    assert override_error("prune.sparsity=0.5", "allocation.method=owl", "allocation.params.m=-1") == (
        "-S allocation.params.m=-1: allocation.params: m=-1 is outside (0, inf)")
    path = write(tmp_path, "prune:\n  sparsity: 0.5\n  method: wanda\npho: {enabled: false}\n"
                           "allocation:\n  method: owl\n  params:\n    lam: x\n")
    assert str(error_of(path)).startswith(f"{path}:8:5: allocation.params: lam='x' is outside")
    assert override_error("prune.sparsity=0.0", "allocation.method=owl", "pho.enabled=false").startswith(
        "-S allocation.method=owl: allocation.method: target sparsity 0.0 is outside (0, 1)")

    assert override_error("refine.method=dsnot", "refine.params.order=x") == (
        "-S refine.params.order=x: refine.params: order='x' is not one of initial, wanda")


def test_prune_level_checks_are_the_librarys_and_run_at_load_time():
    """Everything PruneConfig.validate rejects fails when the config loads, at the key it is about."""
    assert override_error("prune.targets=(").startswith(
        "-S prune.targets=(: prune.targets: targets '(' is not a valid regular expression")
    assert override_error("prune.method=sparsegpt", "pho.enabled=false", "prune.sparsity=0.5", "prune.group=row") == (
        "-S prune.group=row: prune.group: group='row' does not apply to method 'sparsegpt', which selects its "
        "unstructured mask per column block itself; leave --group unset")


# --- overrides -------------------------------------------------------------------------------------------


def test_overrides_set_values_in_order_with_yaml_scalars():
    cfg = load_config(PARAMS, ["prune.sparsity=0.6", "pho.n_trials=30", "pho.top_k=5", "eval.ppl.max_windows=null",
                               "pho.bounds.alpha=[0.5, 1.5]", "eval.zero_shot.tasks=[boolq, rte]",
                               "prune.params.gamma=1e-3", "calibration.seed=1", "calibration.seed=2"])
    assert cfg.prune.sparsity == "0.6" and cfg.pho.n_trials == 30 and cfg.pho.top_k == 5
    assert cfg.eval.ppl.max_windows is None
    assert cfg.pho.bounds.alpha == (0.5, 1.5)
    assert cfg.eval.zero_shot.tasks == ["boolq", "rte"]
    assert cfg.prune.params["gamma"] == 0.001
    assert cfg.calibration.seed == 2  # the last one wins
    assert cfg.overrides[0] == "prune.sparsity=0.6"
    assert "with -S prune.sparsity=0.6 -S pho.n_trials=30" in cfg.dump_yaml().splitlines()[0]


def test_override_creates_a_section_missing_from_a_partial_file(tmp_path):
    cfg = load_config(write(tmp_path, "model:\n  dtype: bfloat16\n"), ["eval.ppl.seqlen=128"])
    assert cfg.eval.ppl.seqlen == 128 and cfg.model.dtype == "bfloat16"


def test_malformed_and_unknown_overrides():
    assert override_error("prune.sparsity") == ("-S: override 'prune.sparsity' must look like section.key=value, "
                                                "e.g. prune.sparsity=0.6")
    assert override_error("=3").startswith("-S: override '=3' must look like")
    assert override_error("prune..x=3").startswith("-S: override 'prune..x=3'")
    assert override_error("prune.sparsty=0.6") == (
        "-S prune.sparsty=0.6: unknown key 'prune.sparsty'; allowed keys of 'prune': method, sparsity, group, rule, "
        "params, targets, ignore, prune_router, moe_min_tokens, moe_fallback, update, update_params (did you mean 'sparsity'?)")
    assert override_error("foo.bar=1").startswith("-S foo.bar=1: unknown key 'foo'; allowed keys (sections): model,")
    assert override_error("prune.sparsity.x=1") == ("-S prune.sparsity.x=1: 'prune.sparsity' is a value, not a "
                                                    "section, so 'prune.sparsity.x' cannot be set")
    assert override_error("pho.bounds.alpha=[0, 1") == (
        "-S pho.bounds.alpha=[0, 1 (column 6): malformed YAML: while parsing a flow sequence expected ',' or ']', "
        "but got '<stream end>'; quote a string value that starts with [ or { or holds ': ', e.g. "
        "-S 'key=\"{model}-x\"'")
    assert "quote a string value" in override_error("release.model_name={model}-{x}")


# --- hashes ------------------------------------------------------------------------------------------------


def test_section_hash_changes_only_with_its_section():
    base = load_config(PARAMS)
    changed = load_config(PARAMS, ["prune.sparsity=4:8"])
    for name in SECTIONS:
        same = base.section_hash(name) == changed.section_hash(name)
        assert same == (name != "prune"), name
    assert base.config_hash() != changed.config_hash()
    deeper = load_config(PARAMS, ["eval.zero_shot.limit=10"])
    assert base.section_hash("eval.ppl") == deeper.section_hash("eval.ppl")
    assert base.section_hash("eval.zero_shot") != deeper.section_hash("eval.zero_shot")
    assert base.section_hash("eval") != deeper.section_hash("eval")


def test_section_hash_is_a_canonical_identity():
    base = load_config(PARAMS, ["prune.sparsity=0.5"])
    for spelling in ("prune.sparsity=50%", "prune.sparsity='0.5'", "prune.sparsity=0.50"):
        assert load_config(PARAMS, [spelling]).section_hash("prune") == base.section_hash("prune"), spelling
    # an explicit default equals an omitted one; an int coefficient equals its float
    assert load_config(PARAMS, ["prune.sparsity=0.5", "prune.params.alpha=1"]).section_hash("prune") == \
        base.section_hash("prune")
    assert load_config(PARAMS, ["prune.sparsity=0.5", "prune.group=layer"]).section_hash("prune") == \
        base.section_hash("prune")
    # equal content under two names does not collide (refine and allocation are both {none, {}})
    assert base.section_hash("refine") != base.section_hash("allocation")
    assert len(base.section_hash("prune")) == 64 and int(base.section_hash("prune"), 16) >= 0


def test_section_hash_is_stable_across_processes():
    code = ("import json; from tasks.config import load_config; c = load_config('params.yaml'); "
            "print(json.dumps(c.section_hashes()))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "PYTHONHASHSEED": "123"}, check=True).stdout
    assert json.loads(out) == load_config(PARAMS).section_hashes()


def test_unknown_section_hash_name():
    cfg = load_config(PARAMS)
    with pytest.raises(ConfigError, match=r"no section 'prun'; sections: model, data"):
        cfg.section_hash("prun")
    with pytest.raises(ConfigError, match=r"no section 'eval.pl' \('eval' has sub-sections: ppl, zero_shot\)"):
        cfg.section_hash("eval.pl")
    with pytest.raises(ConfigError, match=r"no section 'prune.method'"):
        cfg.section_hash("prune.method")


_ALTERNATIVES = {
    "model": ["model.dtype=bfloat16", "model.device=cpu", "model.blocks=model.layers"],
    "data": ["data.calib_source=pydoc", "data.data_dir=/x"],
    "calibration": ["calibration.samples=8", "calibration.seed=3", "calibration.batch_size=2"],
    "prune": ["prune.sparsity=0.5", "prune.params.gamma=0.1"],
    "pho": ["pho.n_trials=30", "pho.sampler=tpe", "pho.bounds.beta=[0, 1]", "pho.search_kernel=true"],
    "eval": ["eval.ppl.seqlen=128", "eval.zero_shot.tasks=[rte]"],
    "tracking": ["tracking.experiment=pruning-{model}"],
    "runner": ["runner.max_workers=4", "runner.backend=dask"],
    "release": ["release.alias=champion", "release.out_dir=out/rel"],
}


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(sorted(_ALTERNATIVES)).flatmap(lambda s: st.tuples(st.just(s), st.sampled_from(_ALTERNATIVES[s]))))
def test_property_one_changed_key_changes_exactly_its_sections_hash(case):
    section, override = case
    base = load_config(PARAMS).section_hashes()
    changed = load_config(PARAMS, [override]).section_hashes()
    assert {name for name in SECTIONS if base[name] != changed[name]} == {section}


# --- dump, immutability, derived objects ---------------------------------------------------------------------


def test_dump_round_trips_and_is_written_atomically(tmp_path):
    cfg = load_config(PAPER, ["prune.sparsity=2:4", "pho.search_kernel=true"])
    out = cfg.write_resolved(tmp_path / "resolved" / "params.yaml")
    again = load_config(out)
    assert again == cfg and again.section_hashes() == cfg.section_hashes()
    assert json.loads(json.dumps(cfg.to_dict())) == cfg.to_dict()
    assert not [p for p in out.parent.iterdir() if p.name != "params.yaml"]


def test_config_is_frozen():
    cfg = load_config(PARAMS)
    with pytest.raises(Exception, match="frozen"):
        cfg.prune.method = "ria"  # type: ignore[misc]
    with pytest.raises(Exception, match="frozen"):
        cfg.prune = cfg.prune  # type: ignore[misc]


def test_derived_objects_for_the_stages():
    cfg = load_config(PARAMS, ["pho.search_kernel=true"])
    pc = cfg.prune_config({"alpha": 0.5, "gamma": 0.001})
    assert pc.method == "crepe" and str(pc.sparsity.pattern) == "2:4"
    assert pc.resolved_params()["alpha"] == 0.5 and pc.resolved_params()["beta"] == 1.0
    budget = cfg.budget()
    assert (budget.calib_samples, budget.seqlen, budget.eval_len, budget.max_windows) == (16, 256, 256, 16)
    assert cfg.pho_budget().max_windows == 16
    space = cfg.search_space()
    assert space.names == ("alpha", "beta", "log10_gamma", "kernel_size") and space.log10_gamma == (-5.0, 0.0)
    assert cfg.tracking_uri() == f"sqlite:///{REPO.as_posix()}/mlflow.db"
    assert load_config(PARAMS, ["tracking.uri=sqlite:////abs/x.db"]).tracking_uri() == "sqlite:////abs/x.db"
    assert cfg.experiment_name() == "crepe-smollm2-135m"
    assert cfg.registered_model_name() == "crepe-smollm2-135m-2of4"
    assert cfg.release_dir() == REPO / "data" / "release"
    assert cfg.sparsity_spec().pattern.m == 4
    assert cfg.data_dir() is None
    assert load_config(PARAMS, ["data.data_dir=shared"]).budget().data_dir == str(REPO / "shared")
    assert load_config(PARAMS, ["data.data_dir=/abs/d"]).data_dir() == "/abs/d"


def test_slugs_and_project_root(tmp_path):
    assert model_slug("embedded:smollm2-135m") == "smollm2-135m"
    assert model_slug("hf:meta-llama/Llama-2-7b-hf@main") == "meta-llama-Llama-2-7b-hf"
    assert model_slug("/data/models/my model/") == "my-model"
    assert pattern_slug("2:4") == "2of4" and pattern_slug("0.5") == "50pct" and pattern_slug("0.625") == "62p5pct"
    (tmp_path / "proj" / "profiles").mkdir(parents=True)
    (tmp_path / "proj" / "dvc.yaml").write_text("stages: {}\n")
    assert project_root_of(tmp_path / "proj" / "profiles" / "x.yaml") == tmp_path / "proj"
    assert project_root_of(tmp_path / "loose.yaml") == tmp_path


# --- the CLI ---------------------------------------------------------------------------------------------------


def test_cli_config_prints_resolved_yaml_and_hashes(capsys, tmp_path):
    from flows.cli import main

    assert main(["config", "--params", str(PARAMS), "-S", "prune.sparsity=0.5", "--out", str(tmp_path / "r.yaml")]) == 0
    out = capsys.readouterr().out
    assert "sparsity: '0.5'" in out and "group: layer" in out
    assert load_config(tmp_path / "r.yaml") == load_config(PARAMS, ["prune.sparsity=0.5"])
    assert main(["config", "--params", str(PARAMS), "--hashes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == [*SECTIONS, "(all)"]


def test_cli_config_error_is_one_line_and_exit_2(capsys):
    from flows.cli import main

    assert main(["config", "--params", str(PARAMS), "-S", "pho.top_k=99"]) == 2
    err = capsys.readouterr().err
    assert err == ("crepe: error: -S pho.top_k=99: pho.top_k = 99 is larger than pho.n_trials = 20; verify at most "
                   "as many candidates as were screened\n")
