#!/usr/bin/env bash
# Install medtl with its test extras and run the test suite (README command (b); CI runs this).
# On a fresh machine this also installs Debian's chromium for the real-browser report test
# when run as root; elsewhere that test is skipped with a message (it is required under CI=true).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium for the headless-browser report test"
  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium install failed; the browser test will say so"
fi
python -m pip install -q -e ".[test]"
exec python -m pytest "$@"
