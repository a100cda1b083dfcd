# Two commands on a fresh machine: `make demo` (set up, fine-tune on real photos, evaluate, predict)
# and `make test` (set up, lint, run the tests). Both need ../shared beside this checkout.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SHARED ?= ../shared
DEMO_RUN := runs/demo-resnet50

.PHONY: setup browser demo test lint clean

setup: $(VENV)/.installed

# torch is pinned to the CPU wheel that pip finds locally; torchvision goes in with --no-deps so that
# it cannot drag in a CUDA build of torch. Everything else comes from pyproject.toml.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps torchvision==0.28.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

# The page test drives Debian's chromium through chromedriver; CI runs as root with apt available.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		$(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends chromium chromium-driver fonts-dejavu-core; \
	fi

demo: setup
	rm -rf $(DEMO_RUN)
	$(BIN)/resfit train $(SHARED)/data/hymenoptera --model resnet50 \
		--weights $(SHARED)/weights/resnet50-imagenette.pth --out $(DEMO_RUN)
	$(BIN)/resfit evaluate $(DEMO_RUN) $(SHARED)/data/hymenoptera --split val
	$(BIN)/resfit predict $(DEMO_RUN) $(SHARED)/data/hymenoptera/val/ants/10308379_1b6c72e180.jpg \
		$(SHARED)/data/hymenoptera/val/bees/1032546534_06907fe3b3.jpg --top-k 2

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

test: setup browser lint
	RESFIT_SHARED=$(abspath $(SHARED)) $(BIN)/python -m pytest -q -ra --durations=25

clean:
	rm -rf $(VENV) runs .pytest_cache
