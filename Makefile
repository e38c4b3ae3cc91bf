# Two commands set up a fresh machine: `make demo` and `make test`.  Everything they need is
# provisioned here, idempotently: a .venv and a pinned ComfyUI 0.3.75 in .comfyui/ (or the
# checkout named by COMFYUI_DIR) with this pack linked into its custom_nodes/.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(CURDIR)/$(VENV)/bin/python
HOST_DIR := $(or $(COMFYUI_DIR),$(CURDIR)/.comfyui)
STAMP := $(VENV)/.provisioned
PYTEST := $(PY) -m pytest -p no:cacheprovider

.PHONY: comfyui test test-fast test-browser lint format demo serve bench train-toyworld train-toyworld-v2 validate

comfyui: $(STAMP)
	@$(PY) scripts/provision_comfyui.py

$(STAMP): requirements-dev.txt scripts/provision_comfyui.py
	$(PYTHON) scripts/provision_comfyui.py
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	grep -v -E '^(torch|torchvision|torchaudio)([^a-z_-]|$$)' $(HOST_DIR)/requirements.txt > $(VENV)/comfyui-requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check -r $(VENV)/comfyui-requirements.txt -r requirements-dev.txt
	touch $@

# The browser tests need Debian's chromium and the Python playwright driver (idempotent install).
test: comfyui
	bash scripts/install_browser.sh $(PY)
	$(PYTEST) tests

# The in-process tiers only: no server, no browser (markers `server` and `browser`).
test-fast: comfyui
	$(PYTEST) -m "not server and not browser" tests

# ComfyUI's ruff rule set plus import sorting and line length 120 (pyproject.toml [tool.ruff]); CI runs it.
lint: comfyui
	$(VENV)/bin/ruff check .

format: comfyui
	$(VENV)/bin/ruff check --fix .

# Only the tests that drive the real frontend in headless Chromium (tests/browser/, marker `browser`).
test-browser: comfyui
	bash scripts/install_browser.sh $(PY)
	$(PYTEST) -m browser tests/browser

demo: comfyui
	$(PY) scripts/demo.py

serve: comfyui
	cd $(HOST_DIR) && $(PY) main.py --cpu --listen 127.0.0.1 --port 8188

bench: comfyui
	$(PY) bench/$(B).py --quick

train-toyworld: comfyui
	$(PY) -m toyworld.train --stage all --seed 0

# Toy world v2 (docs/toyworld.md): resumable; on a CUDA machine scripts/train_toyworld_v2.sh runs it in
# ten-minute calls and measures the headroom afterwards.
train-toyworld-v2: comfyui
	$(PY) -m toyworld.v2.train --stage all --seed 0

validate: comfyui
	$(VENV)/bin/comfy --skip-prompt --no-enable-telemetry node validate
