# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv if missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_STAMP := $(VENV)/.torch-installed
STAMP := $(VENV)/.hgad-installed
DEMO_DATA ?= demo_data
DEMO_RUN ?= runs/demo

.PHONY: install demo test lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch first, pinned, so that no later package can pull another build.
$(TORCH_STAMP): | $(PY)
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	touch $@

$(STAMP): pyproject.toml $(TORCH_STAMP)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(STAMP)

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

test: lint
	$(PY) -m pytest -q -p no:cacheprovider

demo: install
	@start=$$(date +%s); \
	$(VENV)/bin/hgad demo-data $(DEMO_DATA) --seed 0 && \
	$(VENV)/bin/hgad train --data mvtec:$(DEMO_DATA) --preset fast --out $(DEMO_RUN) --overwrite && \
	$(VENV)/bin/hgad test $(DEMO_RUN) --data mvtec:$(DEMO_DATA) && \
	echo "demo finished in $$(( $$(date +%s) - start )) s (after installation); open $(DEMO_RUN)/test-deploy-inferred/report.html"

bench: install
	$(PY) benchmarks/train_throughput.py --out benchmarks/results/train_throughput-cpu.json
	$(PY) benchmarks/reference_compare.py --out benchmarks/results/reference_compare-fast-cpu.json
	$(PY) benchmarks/reference_compare.py --preset paper --images 16 --out benchmarks/results/reference_compare-paper-cpu.json
	$(PY) benchmarks/inference_latency.py --out benchmarks/results/inference_latency-cpu.json

clean:
	rm -rf $(DEMO_DATA) runs .pytest_cache .ruff_cache
