#!/usr/bin/env bash
# Debian's Go toolchain, for the Ollama TEMPLATE tests: tests/export/test_ollama.py renders the
# Modelfile's TEMPLATE with Go's own text/template, as Ollama does (as root, or through sudo
# without a password).
set -euo pipefail
if [ "$(id -u)" -eq 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
  echo "Go is needed for the Ollama template tests: run 'apt-get install golang-go' as root" >&2
  exit 1
fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq golang-go >/dev/null
go version
