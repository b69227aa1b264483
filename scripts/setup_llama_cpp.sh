#!/usr/bin/env bash
# Opt-in (not part of setup.sh or CI): the llama.cpp peer of `dijiang-export bench`.
# Builds llama-cpp-python from its source distribution (about 15 minutes on 2 cores) and
# unpacks that distribution's llama.cpp tree, whose convert_hf_to_gguf.py
# `export-baseline --formats gguf` runs, under the cache folder (exporters/baseline_gguf.py
# looks there).  Idempotent.
set -euo pipefail
PY=${PYTHON:-python3}
VERSION=0.3.36                                          # = dijiang_edge/runtime/llama.py PIN
CACHE=${DIJIANG_CACHE:-$HOME/.cache/dijiang_edge}
TREE="$CACHE/llama.cpp-$VERSION"
$PY -c "import llama_cpp" 2>/dev/null || nice -n 10 $PY -m pip install -q --disable-pip-version-check "llama-cpp-python==$VERSION"
if [ ! -f "$TREE/convert_hf_to_gguf.py" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  $PY -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: -d "$tmp" "llama-cpp-python==$VERSION"
  tar -xzf "$tmp"/llama_cpp_python-$VERSION.tar.gz -C "$tmp"
  mkdir -p "$CACHE"
  rm -rf "$TREE.partial"
  mv "$tmp/llama_cpp_python-$VERSION/vendor/llama.cpp" "$TREE.partial"
  mv "$TREE.partial" "$TREE"
fi
echo "llama-cpp-python $($PY -c 'import llama_cpp; print(llama_cpp.__version__)'); converter: $TREE/convert_hf_to_gguf.py"
