# Two commands for a new user: `make demo` and `make test` (see README).
# Setup is idempotent: a second run only checks stamps and returns.

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# This machine ships these builds on local disk; elsewhere pick your own,
# e.g. `make demo TORCH_SPEC="torch torchvision"`.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DEB_PACKAGES := dataset-fashion-mnist opencv-doc gcompris-qt-data
STAMP := $(VENV)/.installed
export PATH := $(abspath $(VENV))/bin:$(PATH)
# Keep Prefect's local database and settings inside the project, not in ~/.prefect.
export PREFECT_HOME ?= $(abspath .prefect)
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: setup demo test data-packages metrics server deploy worker preset lock

setup: $(STAMP) data-packages

# requirements.lock pins every dependency but the torch stack with hashes; torch is the
# accelerator's choice (TORCH_SPEC), installed first, and `pip check` proves the two agree.
PIP := $(PY) -m pip --disable-pip-version-check
$(STAMP): pyproject.toml requirements.lock Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q --no-deps --require-hashes -r requirements.lock
	$(PIP) install -q --no-deps --no-build-isolation -e .
	$(PIP) check
	@touch $(STAMP)

# Re-resolve requirements.lock from pyproject.toml (newest versions that fit, with hashes),
# against the torch that TORCH_SPEC names, then leave the torch stack out of it.
TORCH_STACK := ^(torch|torchvision|torchaudio|triton|nvidia-[^=]*|cuda-[^=]*)==
lock:
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q pip-tools
	printf '%s\n' $(TORCH_SPEC) > $(VENV)/torch-constraint.txt
	$(VENV)/bin/pip-compile --quiet --generate-hashes --extra test --strip-extras --allow-unsafe \
		--no-emit-find-links --no-emit-index-url --no-emit-trusted-host --no-header \
		--constraint $(VENV)/torch-constraint.txt --output-file $(VENV)/full.lock pyproject.toml
	{ echo "# Exact versions and hashes of every dependency but the torch stack, for Python 3.11"; \
	  echo "# on Linux x86_64. Torch is each machine's choice (Makefile: TORCH_SPEC); made by"; \
	  echo "# \`make lock\` with $(TORCH_SPEC). Install: see the Makefile's setup."; \
	  awk '/^[^ #]/ { skip = ($$0 ~ /$(TORCH_STACK)/) } !skip' $(VENV)/full.lock; } > requirements.lock

# Debian data the embedded default reads; installed when we can, explained when we can't.
data-packages:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian packages: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	else \
		echo "NOTE: missing Debian packages: $$missing"; \
		echo "      install them with: sudo apt-get install $$missing"; \
		echo "      (without opencv-doc or gcompris-qt-data the photo source has fewer classes;"; \
		echo "       without dataset-fashion-mnist"; \
		echo "       set sources.fashion_mnist.uri to the dataset's public URL)"; \
	fi

# DVC reruns only what is stale. The `inputs` stage, which fingerprints what lies outside the
# project (image folders, archives, package versions), runs every time, in seconds, so a
# second demo looks again at those and reruns nothing else unless one of them changed.
demo: setup
	@git rev-parse --git-dir >/dev/null 2>&1 || (echo "run inside the git clone (DVC needs it)"; exit 1)
	python -m flows.pipeline
	@echo; echo "mP@5 on classes never seen in training (data/06_eval/metrics.md):"; cat data/06_eval/metrics.md

test: setup
	$(PY) -m pytest

metrics:
	dvc metrics show

# Switch params.yaml to a recipe in presets/ (validated first): `make preset NAME=2xclip`,
# then `make demo` or `dvc exp run -n $(NAME)`. Without NAME it lists them.
preset: setup
	python -m flows.preset $(NAME)

# --- Prefect UI and scheduled runs (see README) ------------------------------
PREFECT_PORT ?= 4200
SERVER_URL := http://127.0.0.1:$(PREFECT_PORT)/api

# The UI at http://127.0.0.1:$(PREFECT_PORT); runs of `make demo` are in the same database.
server: setup
	PREFECT_UI_API_URL=$(SERVER_URL) prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

# Register prefect.yaml's deployments (nightly cron) and their process work pool.
deploy: setup
	PREFECT_API_URL=$(SERVER_URL) prefect work-pool inspect guie-local >/dev/null 2>&1 || \
		PREFECT_API_URL=$(SERVER_URL) prefect work-pool create guie-local --type process
	PREFECT_API_URL=$(SERVER_URL) GUIE_PROJECT_DIR=$(CURDIR) prefect --no-prompt deploy --all

# Execute scheduled and manual runs of the deployments.
worker: setup
	PREFECT_API_URL=$(SERVER_URL) prefect worker start --pool guie-local
