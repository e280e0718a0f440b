# Two commands are the whole set-up (README, "Two commands"):
#   make demo   create .venv when missing, install fkd with its extras, run the quickstart
#   make test   the same environment, then the test suite
#   make docs   the documentation site (MkDocs, Material, mkdocstrings) into site/, strictly
#
# Variables (make demo TORCH_SPEC="torch torchvision" ...):
#   TORCH_SPEC   the torch and torchvision requirements pip installs first; the default is the pair this
#                project is tested with; any torch >= 2.5 with its torchvision works
#   TORCH_INDEX  a pip index for torch alone, e.g. https://download.pytorch.org/whl/cpu for the
#                CPU-only build (a much smaller download than the CUDA one on Linux)
#   EXTRAS       fkd extras for demo and test (test: pytest and matplotlib; export: ONNX; safetensors and
#                tensorboard: weight files and log.tensorboard, which the tests read back; timm: timm models)
#   PYTHON       the interpreter that creates .venv (3.11 or later)
#   PYTEST_ARGS  passed to pytest, e.g. make test PYTEST_ARGS="tests/test_cli.py -x"

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
TORCH_INDEX ?=
EXTRAS ?= test,export,safetensors,tensorboard,timm
PYTEST_ARGS ?=
DEMO_CONFIG ?= configs/feature.toml
DEMO_RUN ?= runs/feature

BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet
comma := ,
INSTALLED := $(VENV)/.fkd-installed-$(subst $(comma),+,$(EXTRAS))

.PHONY: demo test docs

demo: $(INSTALLED)
	@if [ -f $(DEMO_RUN)/checkpoints/latest.pt ]; then \
	    echo "$(DEMO_RUN) already holds the quickstart run (a finished run is never overwritten):"; \
	    echo "evaluating it instead; remove $(DEMO_RUN) to train it again."; \
	    $(BIN)/python cli.py evaluate $(DEMO_RUN) --device cpu; \
	else \
	    $(BIN)/python cli.py distill --config $(DEMO_CONFIG); \
	fi

test: $(INSTALLED)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

docs: $(VENV)/.fkd-installed-docs
	$(BIN)/mkdocs build --strict

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.fkd-installed-%: pyproject.toml | $(BIN)/python
	$(PIP) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) $(TORCH_SPEC)
	$(PIP) -e ".[$(subst +,$(comma),$*)]"
	@touch $@
