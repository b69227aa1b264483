# Two commands do all set-up on a fresh machine (see README.md):
#   make demo   installs, then converts the embedded default model, exports it to ONNX
#               fp32 + int8 (parity checked at export), generates with both, benches decode
#               at two context lengths (out/demo-bench)
#   make test   installs, then runs the test suite (what CI runs)
#   make bench  DiJiang vs the softmax KV-cache baseline (ONNX fp32 + int8) -> out/bench
#               (BENCH_FLAGS=--quick for a few minutes)
PY ?= python3
OUT ?= out/smollm2
PROMPT ?= The three most useful things to pack for a long hike are

.PHONY: setup demo test test-slow bench

setup:
	bash scripts/setup.sh

demo: setup
	dijiang-export export default --out $(OUT) --formats onnx --quant fp32,int8 --force
	dijiang-export generate $(OUT) --format onnx --quant fp32 --prompt "$(PROMPT)" --max-new-tokens 32
	dijiang-export generate $(OUT) --format onnx --quant int8 --prompt "$(PROMPT)" --max-new-tokens 32
	dijiang-export bench $(OUT) --no-baseline --quant fp32,int8 --quick --out out/demo-bench --force

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

bench: setup
	[ -f $(OUT)/manifest.json ] || dijiang-export export default --out $(OUT) --formats onnx --quant fp32,int8
	[ -f $(OUT)-softmax/manifest.json ] || dijiang-export export-baseline default --out $(OUT)-softmax --formats onnx --quant fp32,int8
	dijiang-export bench $(OUT) --baseline $(OUT)-softmax --quant fp32,int8 --out out/bench --force $(BENCH_FLAGS)
