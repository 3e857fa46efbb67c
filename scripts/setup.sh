#!/usr/bin/env bash
# Create .venv and install medclf with its test extras. Safe to re-run.
# Also installs dciodvfy (Debian/Ubuntu package dicom3tools), which the tests use to validate the
# DICOM objects medclf writes; it needs root (or sudo) and apt-get, and is skipped with a message
# otherwise (those tests then fail, naming what is missing).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[test]"
if ! command -v dciodvfy >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
  if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; }; then
    $SUDO apt-get install -y -qq dicom3tools >/dev/null 2>&1 \
      || { $SUDO apt-get update -qq >/dev/null 2>&1 && $SUDO apt-get install -y -qq dicom3tools >/dev/null 2>&1; } \
      || echo "setup: could not install dicom3tools (dciodvfy); DICOM validation tests will fail" >&2
  else
    echo "setup: dciodvfy not found; install dicom3tools (apt-get install dicom3tools) for the DICOM validation tests" >&2
  fi
fi
