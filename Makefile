# Two commands do all set-up on a fresh machine (see README.md):
#   make demo   installs, then converts and exports the embedded default model and runs it
#   make test   installs, then runs the test suite (what CI runs)
PY ?= python3
OUT ?= out/smollm2
PROMPT ?= The three most useful things to pack for a long hike are

.PHONY: setup demo test test-slow

setup:
	bash scripts/setup.sh

demo: setup
	dijiang-export convert default --out $(OUT)-torch --force
	dijiang-export generate $(OUT)-torch --prompt "$(PROMPT)" --max-new-tokens 32

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow
