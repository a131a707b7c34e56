#!/usr/bin/env bash
# Debian's chromium and a CJK font (1.6 MB), for the browser tests (as root, or through sudo
# without a password).
set -euo pipefail
if [ "$(id -u)" -eq 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
  echo "chromium is needed for the browser tests: run 'apt-get install chromium' as root" >&2
  exit 1
fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium fonts-wqy-microhei >/dev/null
chromium --version
