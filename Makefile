# Two commands for a fresh clone: `make demo` and `make test` (see README).
PYTHON ?= python3
UV_VERSION := 0.13.9
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
export UV_PYTHON_DOWNLOADS := never
export UV_PYTHON := $(PYTHON)

.PHONY: venv demo app test test-fast lint deploy image bench clean

# `make image`: the image the ctcd-kubernetes pool runs (Containerfile). docker when its engine
# answers (`docker info`), else podman. IMAGE_BUILD_FLAGS passes more flags to the build.
IMAGE ?= ctcd:latest
BASE ?= python:3.11-slim-bookworm
CONTAINER_ENGINE ?= $(shell docker info >/dev/null 2>&1 && echo docker || echo podman)
IMAGE_BUILD_FLAGS ?=

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet "uv==$(UV_VERSION)"

$(VENV)/.synced: $(UV) pyproject.toml uv.lock
	$(UV) sync --locked --quiet --compile-bytecode
	touch $@

venv: $(VENV)/.synced

demo: venv
	$(VENV)/bin/ctcd demo

# The Streamlit app on http://$(APP_ADDRESS):$(APP_PORT); ARGS="--model M --deployer BLOCK".
APP_ADDRESS ?= 127.0.0.1
APP_PORT ?= 8501
app: venv
	$(VENV)/bin/streamlit run app/streamlit_app.py --server.address $(APP_ADDRESS) \
		--server.port $(APP_PORT) --server.headless true --browser.gatherUsageStats false \
		--client.toolbarMode minimal \
		-- $(ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/pytest

# The tests that start no server or process (marker `unit`), in under a minute; `make test`
# runs everything. One part: `.venv/bin/pytest -m server` (or kubernetes, image), or a file.
test-fast: venv
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/pytest -m unit -q

deploy: venv
	$(VENV)/bin/python -m deployments.setup

image:
	$(CONTAINER_ENGINE) build -f Containerfile --build-arg BASE=$(BASE) -t $(IMAGE) $(IMAGE_BUILD_FLAGS) .

bench: venv
	$(VENV)/bin/python bench/pipeline.py

clean:
	rm -rf $(VENV) $(TOOLS)
