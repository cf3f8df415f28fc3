# Two entry points: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# torch/torchvision pair installed first so that open_clip's torchvision requirement cannot pull
# another (multi-GB CUDA) torch. Override for a GPU box, e.g. make TORCH_SPEC="torch==2.13.0 torchvision==0.28.0 --index-url ...".
TORCH_SPEC ?= torch==2.13.0 torchvision==0.28.0

.PHONY: demo test venv clean bench emoji-sources

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]' $(TORCH_SPEC)
	touch $@

venv: $(VENV)/.installed

# Debian's Noto font / emoji names / CLDR keywords and npm's held-out artwork (idempotent).
emoji-sources:
	bash scripts/install_emoji_sources.sh

test: venv emoji-sources
	$(PY) -m pytest tests

demo: venv emoji-sources
	$(VENV)/bin/holiclip demo $(DEMO_ARGS)

bench: venv
	for f in bench/*.py; do $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) runs .cache
