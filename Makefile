# Two commands do everything on a machine with only Python 3: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench paper clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): setup.cfg pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[train,test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m training.demo

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[train,test,bench]'
	$(PY) -m training.benchmark

# The paper's claims reproduced (README, "The paper's claims, reproduced"): figures and
# summary in results/paper/.
paper: $(STAMP)
	$(PY) -m pip install --quiet -e '.[train,test,paper]'
	$(PY) -m training.paper

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
