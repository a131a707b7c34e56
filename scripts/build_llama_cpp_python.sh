#!/usr/bin/env bash
# Install llama.cpp's Python binding (PyPI llama-cpp-python, compiled from its sdist for this CPU,
# without AMX: scripts/llama_cpp_flags.sh) into VENV. About 8 minutes on 2 cores; the wheel is
# kept per version and CPU in ~/.cache/lorasft (pip's own wheel cache would hand back a build made
# with other flags), so a fresh clone on the same machine installs it in seconds.
#
#   scripts/build_llama_cpp_python.sh VENV
set -euo pipefail
VENV=$(cd "${1:?usage: build_llama_cpp_python.sh VENV}" && pwd)
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
. "$(dirname "$0")/llama_cpp_flags.sh"
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/lorasft/llama-cpp-python/$VERSION-$CPU-$BUILD_TAG
if ! ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
  WORK=$(mktemp -d)
  trap 'rm -rf "$WORK"' EXIT
  CFLAGS="$NO_AMX" CXXFLAGS="$NO_AMX" "$VENV/bin/pip" wheel --quiet --no-cache-dir --no-deps \
    --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -w "$WORK"
  mkdir -p "$CACHE"
  mv "$WORK"/llama_cpp_python-"$VERSION"-*.whl "$CACHE"/
fi
"$VENV/bin/pip" install --quiet --force-reinstall --no-deps "$CACHE"/llama_cpp_python-"$VERSION"-*.whl
