# `make serve` and `make test` do all the set-up on a fresh machine (Python 3.11-3.14 and pip).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
LOCK ?= requirements/cpu.lock
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(notdir $(LOCK))
# torch's CPU build is not on PyPI: take it from PyTorch's CPU index, unless pip already has a
# local wheel folder (PIP_FIND_LINKS), as on machines with no access to that index.
TORCH_INDEX ?= $(if $(PIP_FIND_LINKS),,--extra-index-url https://download.pytorch.org/whl/cpu)

.PHONY: setup serve serve-ray test test-fast lint format lock bench-mbr bench-fanout bench-overhead bench-soak bench-soak-onednn bench-replicas bench-payoff bench-tts bench-vllm-client clean

setup: $(STAMP)

# Idempotent: the stamp is newer than the lock and pyproject, so a second run does nothing.
$(STAMP): $(LOCK) pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --no-deps $(TORCH_INDEX) -r $(LOCK)
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -c "import vllm, torch, peft, ivon, ivonserve" 2>/dev/null
	touch $@

# tcmalloc, which vLLM's CPU guide recommends, when installed (Debian: libtcmalloc-minimal4): in the
# soak, vLLM's worker grew half as much as under glibc's malloc (docs/benchmarks.md, Soak).
TCMALLOC ?= $(firstword $(wildcard /usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4))

serve: setup
	$(if $(TCMALLOC),LD_PRELOAD=$(TCMALLOC) )$(BIN)/ivonserve serve $(ARGS)

# Replicas on a local Ray cluster that this starts and stops (Ray Serve); RAY_ADDRESS=... joins an
# existing one instead. Each replica takes NUM_CPUS CPUs of the cluster.
REPLICAS ?= 1
NUM_CPUS ?= 1
serve-ray: setup
	$(if $(TCMALLOC),LD_PRELOAD=$(TCMALLOC) )$(BIN)/ivonserve serve-ray --replicas $(REPLICAS) \
	  --num-cpus $(NUM_CPUS) $(ARGS)

test: setup
	$(BIN)/python -m pytest $(ARGS)

# The inner loop: every test that starts no vLLM engine and no long CLI run (under a minute);
# CI runs `make test`.
test-fast: setup
	$(BIN)/python -m pytest -m "not engine and not e2e and not slow" $(ARGS)

lint: setup
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Resolve the CPU lock from requirements/cpu.in (needs network; review the diff). The current lock
# is the constraints file, so existing pins stay and only new packages are added; `make lock
# RELOCK=1` re-resolves everything from scratch.
lock: setup
	$(BIN)/python requirements/lock.py requirements/cpu.in $(LOCK) \
	  $(if $(RELOCK),,--constraints $(LOCK)) $(TORCH_INDEX)

bench-mbr: setup
	$(BIN)/python bench/mbr.py --out bench/results

bench-fanout: setup
	$(BIN)/python bench/fanout.py --out bench/results

bench-overhead: setup
	$(BIN)/python bench/overhead.py --out bench/results

bench-replicas: setup
	$(BIN)/python bench/replicas.py --out bench/results

# The likelihood ablations (docs/pay-off.md) and the test-time-scaling runs; hours.
bench-payoff: setup
	bash bench/payoff.sh validation && bash bench/payoff.sh test

bench-tts: setup
	bash bench/tts.sh

# Against a running server: make bench-soak URL=http://127.0.0.1:8000 [ARGS="--server-pid PID"]
URL ?= http://127.0.0.1:8000
bench-soak: setup
	$(BIN)/python bench/soak.py --url $(URL) --out bench/results/soak $(ARGS)

# oneDNN's primitive cache at its default against capped (CAPS="1024 64"), a soak each (~20 min each)
bench-soak-onednn: setup
	bash bench/soak_onednn.sh

bench-vllm-client: setup
	bash bench/vllm_client.sh $(URL)

clean:
	rm -rf $(VENV)
