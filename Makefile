# The two commands: `make test` and `make demo`. Both create .venv from the
# pins (setup.py + constraints.txt) when it is missing or older than the pins.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_STAMP := $(shell date +%Y%m%d-%H%M%S)
RUN_DIR ?= runs/demo-$(DEMO_STAMP)
# Test processes (pytest-xdist; a file runs whole in one of them, so its fixtures run once).
# Files go out slowest first (tests/conftest.py's SLOWEST_FIRST), not by xdist's test count;
# the 20 slowest tests are listed at the end, for whoever trims the suite next.
TEST_WORKERS ?= 2
DEMO_MODEL ?= random:tiny
# A second family, embedded and probed too, so the report compares backbones.
DEMO_MODEL2 ?= random:siglip-tiny

.PHONY: test demo bench venv clean

venv: $(STAMP)

$(STAMP): setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[test,gcp]'  # gcp: the Dataflow dry-run test
	$(PY) -m pip install -q --no-deps -c constraints.txt open_clip_torch  # setup.py's open_clip_reference
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=20 tests

# The whole comparison on the built-in digits dataset with random weights
# (the machinery, not CLIP's quality). Everything lands in $(RUN_DIR).
demo: $(STAMP)
	@echo "== demo run directory: $(RUN_DIR)"
	@echo "== 1/5 embed digits once (Beam, local runner; pooled + projected features)"
	$(PY) -m pipelines.embed --dataset=digits --data_dir=$(RUN_DIR)/tfds --model=$(DEMO_MODEL) \
	  --output_dir=$(RUN_DIR)/embeddings
	@echo "== 2/5 zero-shot (text tower, prompt ensemble) on the cached projected features"
	$(PY) -m probe.zeroshot --embeddings=$(RUN_DIR)/embeddings --output_dir=$(RUN_DIR)/zeroshot
	@echo "== 3/5 linear probe (JAX + scikit-learn baseline, true few-shot), then the probe anchored"
	@echo "       at the zero-shot head (same shots, same draws)"
	$(PY) -m probe.train --embeddings=$(RUN_DIR)/embeddings --output_dir=$(RUN_DIR)/probe \
	  --shots=1,2,4,8,16 --seeds=3
	$(PY) -m probe.train --embeddings=$(RUN_DIR)/embeddings --output_dir=$(RUN_DIR)/anchored \
	  --method=zeroshot-anchored --zeroshot=$(RUN_DIR)/zeroshot --shots=1,2,4,8,16 --seeds=3
	@echo "== 4/5 fine-tune: linear (frozen backbone) and full, then LP-FT (full from the probe's head);"
	@echo "       lr and step chosen on validation; WiSE-FT mixes each with its start"
	$(PY) -m finetune.train --dataset=digits --data_dir=$(RUN_DIR)/tfds --model=$(DEMO_MODEL) \
	  --workdir=$(RUN_DIR)/finetune --mode=linear,full --epochs=10 --wise=0,0.25,0.5,0.75,1
	$(PY) -m finetune.train --dataset=digits --data_dir=$(RUN_DIR)/tfds --model=$(DEMO_MODEL) \
	  --workdir=$(RUN_DIR)/finetune --mode=full --epochs=10 --head_init=probe:$(RUN_DIR)/probe \
	  --wise=0,0.25,0.5,0.75,1
	@echo "== 5/5 a second backbone ($(DEMO_MODEL2)): embed, zero-shot, probe; then the comparison"
	$(PY) -m pipelines.embed --dataset=digits --data_dir=$(RUN_DIR)/tfds --model=$(DEMO_MODEL2) \
	  --output_dir=$(RUN_DIR)/backbone2/embeddings
	$(PY) -m probe.zeroshot --embeddings=$(RUN_DIR)/backbone2/embeddings \
	  --output_dir=$(RUN_DIR)/backbone2/zeroshot
	$(PY) -m probe.train --embeddings=$(RUN_DIR)/backbone2/embeddings \
	  --output_dir=$(RUN_DIR)/backbone2/probe
	$(PY) -m report.compare $(RUN_DIR) $(RUN_DIR)/backbone2
	@echo "== done: outputs in $(RUN_DIR) (report.md, report.png)"

bench: $(STAMP)
	$(PY) -m benchmarks.run

clean:
	rm -rf $(VENV) runs
