#!/usr/bin/env bash
# Make Debian's chromium available for the browser tests (tests/browser/), installing it with apt
# when it is missing and we may (root, or passwordless sudo). Never fails the caller: without a
# browser the tests skip locally and fail under CI=true, each with a one-line reason.
set -uo pipefail

if command -v chromium >/dev/null 2>&1 || [ -n "${RFT_CHROMIUM:-}" ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_chromium: no chromium and no apt-get; browser tests will not run (set RFT_CHROMIUM=/path/to/chromium)"
    exit 0
fi
if [ "$(id -u)" = 0 ]; then
    as_root=()
elif sudo -n true 2>/dev/null; then
    as_root=(sudo -n)
else
    echo "ensure_chromium: chromium missing; install it with 'sudo apt-get install chromium' to run the browser tests"
    exit 0
fi
echo "ensure_chromium: installing Debian's chromium (about a minute)"
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -q >/dev/null \
    && "${as_root[@]}" apt-get install -y -q --no-install-recommends chromium >/dev/null \
    || echo "ensure_chromium: apt-get could not install chromium; browser tests will not run"
exit 0
