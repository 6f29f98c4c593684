# relaymilter - `make run` starts the milter, `make test` runs every test.
# Both install what is missing first (Debian packages, a virtualenv).

PYTHON ?= python3
VENV   ?= .venv
# make run's config: packaging/relaymilter.toml with its store in $(DEV),
# so that a normal user can run it (scripts/dev-config).
DEV    ?= build/dev
CONFIG ?= $(DEV)/relaymilter.toml
PY      = $(VENV)/bin/python

.PHONY: run test unit bench check-config man clean

run: $(VENV)/.installed $(CONFIG)
	@echo "relaymilter: starting with $(CONFIG); stop with Ctrl-C"
	$(VENV)/bin/relaymilter run -c $(CONFIG)

test: $(VENV)/.installed
	scripts/install-debian-deps test
	$(PY) -m pytest -q -p no:cacheprovider tests

unit: $(VENV)/.installed
	$(PY) -m pytest -q -p no:cacheprovider tests/unit tests/adapter

bench: $(VENV)/.installed
	scripts/install-debian-deps test
	$(PY) bench/postfix_throughput.py

check-config: $(VENV)/.installed $(CONFIG)
	$(VENV)/bin/relaymilter check-config -c $(CONFIG)

$(VENV)/.installed: setup.cfg pyproject.toml
	scripts/install-debian-deps run
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

$(DEV)/relaymilter.toml: packaging/relaymilter.toml scripts/dev-config
	$(PYTHON) scripts/dev-config packaging/relaymilter.toml $(DEV)

man: $(VENV)/.installed
	$(PY) docs/man/generate.py

clean:
	rm -rf $(VENV) build *.egg-info
