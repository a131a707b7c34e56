#!/usr/bin/env bash
# Build llama.cpp's `llama-server` and `llama-quantize` (for `lorasft export --type q4_k_m` and the
# other k-quants) as users get them: from the llama.cpp source that the PyPI sdist
# of llama-cpp-python vendors (the same llama.cpp as the Python binding lorasft's tests use), with
# cmake and ninja from PyPI, for this CPU (GGML_NATIVE) without AMX (scripts/llama_cpp_flags.sh).
# About 9 minutes on 2 cores; the binary is cached per version and CPU in ~/.cache/lorasft, so a
# fresh clone on the same machine copies it.
#
#   scripts/build_llama_server.sh VENV      installs VENV/bin/llama-server and VENV/bin/llama-quantize
set -euo pipefail
VENV=$(cd "${1:?usage: build_llama_server.sh VENV}" && pwd)
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
. "$(dirname "$0")/llama_cpp_flags.sh"
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/lorasft/llama-server/$VERSION-$CPU-$BUILD_TAG
TOOLS="llama-server llama-quantize"
if [ ! -x "$CACHE/llama-server" ] || [ ! -x "$CACHE/llama-quantize" ]; then
  WORK=$(mktemp -d)
  trap 'rm -rf "$WORK"' EXIT
  "$VENV/bin/pip" install --quiet cmake ninja
  "$VENV/bin/pip" download --quiet --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$WORK"
  tar xzf "$WORK"/llama_cpp_python-"$VERSION".tar.gz -C "$WORK"
  SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
  # No network at build time: no prebuilt web UI download, no HTTPS client (the server is
  # loopback-only behind `lorasft serve`).
  "$VENV/bin/cmake" -S "$SRC" -B "$WORK/build" -G Ninja -DCMAKE_MAKE_PROGRAM="$VENV/bin/ninja" \
    -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON \
    -DCMAKE_C_FLAGS="$NO_AMX" -DCMAKE_CXX_FLAGS="$NO_AMX" \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF > "$WORK/configure.log"
  # shellcheck disable=SC2086  # two targets
  "$VENV/bin/cmake" --build "$WORK/build" --target $TOOLS -j "$(nproc)" > "$WORK/build.log"
  mkdir -p "$CACHE"
  for tool in $TOOLS; do
    install -m 755 "$WORK/build/bin/$tool" "$CACHE/$tool.tmp"
    mv "$CACHE/$tool.tmp" "$CACHE/$tool"
  done
fi
for tool in $TOOLS; do
  install -m 755 "$CACHE/$tool" "$VENV/bin/$tool"
done
"$VENV/bin/llama-server" --version 2>&1 | head -2
