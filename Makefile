# Set-up is part of every target: a fresh clone needs only `make run` or `make test`.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
CONFIG  ?= config/config.yaml
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: run test lint smoke-lock dryrun-paper test-integration clean

$(STAMP): pyproject.toml requirements.lock
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[dev]'
	@touch $(STAMP)

## run: the embedded default experiment, end to end (snakemake, local profile); rerun it after a crash:
## ccalign-dag removes the lock a killed run left (and refuses while a run is live), then runs snakemake
run: $(STAMP)
	$(VENV)/bin/ccalign-dag --profile workflow/profiles/local --configfile $(CONFIG)

## test: lint, then the whole test suite with the integration tests (pytest exit code 5 counts as failure-free)
test: $(STAMP) lint
	CCALIGN_INTEGRATION=1 OMP_NUM_THREADS=1 $(VENV)/bin/pytest -q --durations=15; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc
	OMP_NUM_THREADS=2 $(VENV)/bin/pytest -q tests/golden; rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

## test-integration: only the integration tests (real Slurm cluster, MLflow server + UI, DVC remote)
test-integration: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest -q tests/integration

## smoke-lock: record the smoke outputs' hashes (tests/smoke.dvc.lock) after a change of outputs on purpose
smoke-lock: $(STAMP)
	CCALIGN_UPDATE_SMOKE_LOCK=1 OMP_NUM_THREADS=1 $(VENV)/bin/pytest -q tests/test_pipeline_e2e.py -k committed_lock

## dryrun-paper: every job of the ImageNet reproduction on the Slurm profile, with resources
dryrun-paper: $(STAMP)
	$(VENV)/bin/snakemake --profile workflow/profiles/slurm --configfile config/paper.yaml -n

clean:
	rm -rf .snakemake data/*/ data/mlflow
