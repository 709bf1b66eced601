#!/usr/bin/env bash
# Install medtl with its test extras and run the test suite (README command (b); CI runs this).
# On a fresh machine this also installs Debian's chromium for the real-browser report test
# and dcm2niix (the DICOM-to-NIfTI reference for the geometry tests) when run as root; elsewhere those
# tests are skipped with a message (they are required under CI=true).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium for the headless-browser report test"
  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium install failed; the browser test will say so"
fi
if ! command -v dcm2niix >/dev/null 2>&1 && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing dcm2niix for the DICOM-vs-NIfTI geometry tests"
  (apt-get update -qq && apt-get install -y -qq dcm2niix >/dev/null) || echo "dcm2niix install failed; the geometry tests will say so"
fi
python -m pip install -q -e ".[test]"
# one worker per core (pytest-xdist), a test file's tests on one worker (module fixtures built once)
exec python -m pytest -n auto --dist loadfile "$@"
