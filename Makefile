# Front door: `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
MODEL  := models/resnet56_digits.onnx
OUT    := out

.PHONY: setup demo test test-slow bench bench-quality bench-speed bench-scale clean

setup: $(STAMP)

# torch is pinned to the CPU build through constraints.txt: a looser
# requirement would pull a multi-GB CUDA build of another version. The
# runtime (what `make demo` needs) and the test tools install separately, so
# the demo does not wait for pytest, hypothesis, scikit-learn and transformers.
$(STAMP): pyproject.toml constraints.txt
	@echo "== setup: creating $(VENV) and installing the runtime (torch 2.13.0 CPU, onnx, onnxruntime-gpu, onnx-graphsurgeon, ...); pip stays quiet; measured: about a minute on 2 cores (the whole make demo, fresh clone: 67 s) =="
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e .
	touch $(STAMP)

# onnxruntime-genai's wheel requires the CPU package `onnxruntime`, which would
# land on top of onnxruntime-gpu (both own the `onnxruntime/` folder); it
# loads whichever onnxruntime is importable, so it goes in without its
# dependencies and binds to ours. Its model builder also needs onnx-ir
# (undeclared; onnxscript already brings it, with its own dependencies).
$(TEST_STAMP): $(STAMP) Makefile
	@echo "== setup: installing the test tools (pytest, hypothesis, scikit-learn, transformers, onnxruntime-genai) and calib's extras (Pillow, tokenizers) =="
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	$(BIN)/pip install -q --no-deps -c constraints.txt onnxruntime-genai==0.18.0 onnx-ir==1.1.0
	@echo "== setup: optimum-onnx in its own folder $(VENV)/optimum-onnx (it needs transformers < 4.58; tests run its export in a subprocess) =="
	rm -rf $(VENV)/optimum-onnx
	$(BIN)/pip install -q --no-deps --target $(VENV)/optimum-onnx optimum-onnx==0.1.0 optimum==2.1.0 \
		transformers==4.57.6 huggingface_hub==0.36.2 tokenizers==0.22.2 requests==2.34.2 urllib3==2.8.0 \
		certifi==2026.10.19.post1 charset-normalizer==3.5.3
	touch $(TEST_STAMP)

demo: setup
	@mkdir -p $(OUT)
	@echo "== compress: remove 30% of ResNet-56's residual blocks (default criterion: measured damage) =="
	$(BIN)/sglp-onnx compress $(MODEL) -o $(OUT)/resnet56_digits.pruned.onnx --ratio 0.3 --force \
		--torch-model models.resnet_cifar:resnet56_digits --torch-weights models/resnet56_digits.pt \
		--plot $(OUT)/resnet56_digits.cka.png
	@echo
	@echo "== test accuracy on the held-out digits (before, after) =="
	$(BIN)/sglp-onnx eval $(MODEL) $(OUT)/resnet56_digits.pruned.onnx --data models/digits.test.npz
	@echo
	@echo "== optional healing: 2 epochs of fine-tuning with distillation (about 10 s) =="
	$(BIN)/sglp-onnx finetune $(OUT)/resnet56_digits.pruned.onnx \
		--torch-model models.resnet_cifar:resnet56_digits --torch-weights models/resnet56_digits.pt \
		--train-data models/digits.train.npz --epochs 2 --lr 0.003 --eval-data models/digits.test.npz --force

# Two workers, a test file each at a time (its module fixtures built once):
# every session runs one thread (runtime.default_threads on <= 2 cores), so
# two cores run two files: 5.8-6.5 min in fresh-clone runs on the 2-core machine.
test: $(TEST_STAMP)
	$(BIN)/python -m pytest -m "not slow" -n 2 --dist loadfile

test-slow: $(TEST_STAMP)
	$(BIN)/python -m pytest -m slow
	SGLP_FUZZ_EXPLORE=1 SGLP_FUZZ_EXAMPLES=25 $(BIN)/python -m pytest tests/test_fuzz_cli.py tests/test_fuzz.py

# real_size.py takes 7-9 minutes and about 2 GB of RAM: ResNet-50 at
# 224x224, a 1 GiB MLP and a 32000-token Llama, each against its one-pass
# floor (`--only SECTION` and smaller sizes for a quick run). producer_sweep.py
# (a few minutes): 15 decoder families as optimum-onnx exports them, each
# compressed with the defaults and checked against transformers.
bench: $(TEST_STAMP)
	$(BIN)/python benchmarks/compress_time.py
	$(BIN)/python benchmarks/repair_cost.py
	$(BIN)/python benchmarks/startup.py
	$(BIN)/python benchmarks/latency.py
	$(BIN)/python benchmarks/latency_formats.py
	$(BIN)/python benchmarks/streaming.py
	$(BIN)/python benchmarks/candidate_batching.py
	$(BIN)/python benchmarks/large_model.py
	$(BIN)/python benchmarks/real_size.py
	$(BIN)/python benchmarks/analyze_cost.py
	$(BIN)/python benchmarks/producer_sweep.py

# About 27 minutes, 16 GB of RAM and 25 GB of disk: the 1.1 B-parameter
# Llama built, exported and compressed four ways (benchmarks/llm_scale.py),
# and a SmolLM-135M-shaped decoder with the default options (real_size.py).
bench-scale: $(TEST_STAMP)
	$(BIN)/python benchmarks/llm_scale.py
	$(BIN)/python benchmarks/real_size.py --only llm135m --output benchmarks/results/real_size_llm135m.md

# About 10 minutes on 2 cores (measured: 4.1 + 4.2 min): every criterion on
# ResNet-56, ResNet-110 and the 1-D CNN at ~30% and ~50% FLOPs removed, with
# and without a short fine-tune, mean ranks and held-out fidelity; then the
# tiny Llama's held-out perplexity with 2 and 3 of its 8 layers removed
# (quality_llm.py writes its own section of quality.md); the onnxsim peer,
# the repair forms, and what a shortened halving first round costs
# (halving_first_round.py, about 12 min more).
bench-quality: $(TEST_STAMP)
	$(BIN)/python benchmarks/quality.py
	$(BIN)/python benchmarks/quality_llm.py
	$(BIN)/python benchmarks/peer_onnxsim.py
	$(BIN)/python benchmarks/repair_forms.py
	$(BIN)/python benchmarks/halving_first_round.py

# Minutes: cka-removal runs one partial pass per candidate unit per greedy step.
bench-speed: $(TEST_STAMP)
	$(BIN)/python benchmarks/speed.py

clean:
	rm -rf $(OUT) .pytest_cache
