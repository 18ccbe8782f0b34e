# Two commands: `make run` (a local cluster serving the default model) and `make test`.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
UNAME := $(shell uname -s)

.PHONY: run test install typing system-deps lint bench clean

run: install
	$(VENV)/bin/exo-tools up

test: install typing
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy tests
	$(PY) -m pytest

install: system-deps $(VENV)/.installed

# mypy reads the source folders as the exo.* packages they install as (pyproject.toml)
typing: $(VENV)/.installed
	mkdir -p $(VENV)/typing && ln -sfn $(CURDIR) $(VENV)/typing/exo

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# OpenBLAS makes MLX's Linux CPU backend ~15x faster at prefill (see nodes/mlxenv.py);
# nftables lets tests drop traffic on real sockets (a lost PUB message); iperf3 is
# the reference the link prober's bandwidth is checked against; chromium is the
# real browser the dashboard's tests drive (Playwright, no browser download).
system-deps:
ifeq ($(UNAME),Linux)
	@missing=""; \
	ls /usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0 >/dev/null 2>&1 || missing="$$missing libopenblas0-pthread"; \
	command -v nft >/dev/null 2>&1 || [ -x /usr/sbin/nft ] || missing="$$missing nftables"; \
	command -v iperf3 >/dev/null 2>&1 || missing="$$missing iperf3"; \
	command -v ping >/dev/null 2>&1 || missing="$$missing iputils-ping"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else \
	    echo "note: missing$$missing (Debian/Ubuntu packages); MLX runs slowly without OpenBLAS"; \
	  fi; \
	fi
endif

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: install
	$(VENV)/bin/exo-tools bench overhead

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
