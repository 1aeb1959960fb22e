# Quick start:  make demo   |   make test
# Both create the virtualenv on first use. torch is installed first, pinned (TORCH_SPEC), so pip never resolves
# a different build on its own: on a CPU-only machine torch==2.13.0 is the local CPU wheel. On a GPU machine,
# set TORCH_SPEC to the CUDA build you want (or pre-install it in the venv).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed-stamp

.PHONY: venv demo demo-tiny test test-fast lint slurm-deps ds-ops clean gpu-check wheelhouse

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	# DS_BUILD_OPS=0: DeepSpeed installs as pure Python and JIT-builds the few ops it needs on first use.
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# The real model: Google's pretrained Gemma-3-270M (builtin:gemma-3-270m, a Q4_K_M GGUF from PyPI, dequantized once;
# Gemma Terms of Use) scored on 100 held-out two-digit sums, LoRA-fine-tuned on 2 processes with DeepSpeed ZeRO-2,
# the adapter merged into a plain HF model (shard by shard, verified against base + adapter), the merged model
# scored again on the same sums, two answers generated from it, and the run's curves drawn.
DEMO_EVAL := --data builtin:add-two-digits-eval --max-new-tokens 6 --metric exact_match --nproc 2
demo: $(STAMP)
	rm -rf outputs/demo outputs/demo-before
	$(VENV)/bin/ft eval builtin:gemma-3-270m $(DEMO_EVAL) --out outputs/demo-before
	$(VENV)/bin/ft launch examples/demo.yaml --nproc 2
	$(VENV)/bin/ft export --adapter outputs/demo/final --out outputs/demo/merged
	$(VENV)/bin/ft eval outputs/demo/merged $(DEMO_EVAL) --out outputs/demo/eval-merged
	$(VENV)/bin/ft generate --model outputs/demo/merged --prompt "What is 47 + 38?" --prompt "What is 19 + 64?" \
		--max-new-tokens 6
	$(VENV)/bin/ft plot outputs/demo
	@$(PY) -c "$$SCORE_LINE" outputs/demo-before outputs/demo/eval-merged

# The built-in tiny Llama (random weights, nothing downloaded, about a minute): the same steps on a task a random
# model can learn (repeat three words).
DEMO_TINY_EVAL := --data builtin:repeat-words-eval --max-new-tokens 16 --metric exact_match --metric rouge_l
demo-tiny: $(STAMP)
	rm -rf outputs/demo-tiny outputs/demo-tiny-before
	$(VENV)/bin/ft eval builtin:tiny-llama $(DEMO_TINY_EVAL) --out outputs/demo-tiny-before
	$(VENV)/bin/ft launch examples/demo-tiny.yaml --nproc 2
	$(VENV)/bin/ft export --adapter outputs/demo-tiny/final --out outputs/demo-tiny/merged
	$(VENV)/bin/ft eval outputs/demo-tiny/merged $(DEMO_TINY_EVAL) --out outputs/demo-tiny/eval-merged
	$(VENV)/bin/ft generate --model outputs/demo-tiny/merged --prompt "Repeat: moon fish red" \
		--prompt "Repeat: piano lemon sun"
	$(VENV)/bin/ft plot outputs/demo-tiny
	@$(PY) -c "$$SCORE_LINE" outputs/demo-tiny-before outputs/demo-tiny/eval-merged

# The one line both demos end with, from the two summary.json files `ft eval` wrote.
define SCORE_LINE
import json, sys
b, a = (json.load(open(f"{d}/summary.json"))["metrics"] for d in sys.argv[1:3])
print("held-out score before -> after fine-tuning: " + ", ".join(f"{k} {b[k]:.2f} -> {a[k]:.2f}" for k in b))
endef
export SCORE_LINE

# DeepSpeed builds its C++ ops on first use (DS_BUILD_OPS=0 above). The tests use two on this machine: the shm
# communication op of DeepSpeed's CPU accelerator (every run) and CPU Adam (optimizer offload), about a minute of
# compiling each on 2 cores. `make test` builds them while apt installs Slurm, where the cores are otherwise idle,
# instead of inside the first tests that need them.
test: $(STAMP)
	$(MAKE) --no-print-directory -j3 slurm-deps ds-ops lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope --durations=15

# pytest-xdist workers for `make test`; each module runs whole on one worker (its module fixtures once), and the
# session's training runs are shared by all (tests/conftest.py TrainingRuns).
TEST_WORKERS ?= 2

# Build DeepSpeed's JIT ops this machine's runs load (into torch's extension cache, where the runs look for them).
ds-ops: $(STAMP)
	@$(PY) -c "$$BUILD_DS_OPS"

define BUILD_DS_OPS
import time
from concurrent.futures import ThreadPoolExecutor
from deepspeed.accelerator import get_accelerator
def build(name):
    builder = get_accelerator().create_op_builder(name)
    if builder is None or not builder.is_compatible(verbose=False):
        return f"{name}: not used on this accelerator"
    started = time.perf_counter()
    builder.load(verbose=False)
    return f"{name}: ready ({time.perf_counter() - started:.0f} s)"
with ThreadPoolExecutor(2) as pool:
    print("ds-ops: " + "; ".join(pool.map(build, ["ShareMemCommBuilder", "CPUAdamBuilder"])))
endef
export BUILD_DS_OPS

# ruff (pyproject.toml [tool.ruff]): pyflakes, pycodestyle, import order, likely bugs, and a docstring on every
# public module, class and function of ftcore/ and launcher/. Part of `make test`, so CI runs it.
lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Slurm (Debian packages) for the tests that run a real 2-node cluster on this machine. Installed when missing
# and this user can (root or passwordless sudo); otherwise says why, and those tests skip with the reason.
slurm-deps:
	@if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null; then \
		exit 0; \
	elif [ "$$(id -u)" = 0 ]; then SUDO=; \
	elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	else echo "slurm-deps: Slurm is not installed and installing it needs root; the Slurm tests will skip"; exit 0; fi; \
	if ! command -v apt-get >/dev/null; then echo "slurm-deps: no apt-get here; install slurmctld, slurmd and" \
		"slurm-client yourself (the Slurm tests skip until then)"; exit 0; fi; \
	$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
		slurmctld slurmd slurm-client >/dev/null && echo "slurm-deps: installed Slurm (slurmctld, slurmd, slurm-client)"

# Everything but the multi-process training runs.
# The inner loop: every test that trains nothing (marker `trains`: it trains a model, or reads a run a fixture
# trains; tests/conftest.py fails a test that starts `ft train`/`ft launch` without it, so the marker stays true).
test-fast: $(STAMP) ds-ops
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal -m "not trains" --durations=10

# GPU readiness. On a machine with the registries: `make wheelhouse` downloads every wheel ft needs beyond what a GPU
# image usually has (torch, transformers, accelerate, peft stay the machine's own) into wheelhouse/, with the real
# model's package. On the GPU machine (no network): `make gpu-check` installs ft from there into the Python that has
# CUDA torch (GPU_PYTHON), runs the gpu-marked tests and a bf16 LoRA step of Gemma-3-270M, and prints one JSON.
WHEELHOUSE ?= wheelhouse
GPU_PYTHON ?= python3
PREINSTALLED := torch transformers accelerate peft
wheelhouse: $(STAMP)
	$(PY) -c 'import tomllib; d = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
		skip = set("$(PREINSTALLED)".split()); print("\n".join(r for r in d["dependencies"] + \
		d["optional-dependencies"]["gemma"] + ["pytest>=8", "pytest-timeout>=2.3", "setuptools>=77", "wheel"] \
		if r.split(">")[0].split("<")[0].split("=")[0].strip() not in skip))' > $(WHEELHOUSE).txt
	$(PY) -m pip download --quiet --dest $(WHEELHOUSE) -r $(WHEELHOUSE).txt

gpu-check:
	DS_BUILD_OPS=0 $(GPU_PYTHON) -m pip install --quiet --no-index --find-links $(WHEELHOUSE) \
		--no-build-isolation -e '.[gemma]' pytest pytest-timeout
	$(GPU_PYTHON) benchmarks/gpu_check.py

clean:
	rm -rf outputs .pytest_cache
