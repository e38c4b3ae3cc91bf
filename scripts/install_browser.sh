#!/usr/bin/env bash
# Browser-test dependencies, installed idempotently: Debian's chromium (apt, only when
# /usr/bin/chromium is missing) and Python Playwright in the venv (the driver only: tests launch
# /usr/bin/chromium through it, so `playwright install` is never run).
set -euo pipefail
PY=${1:-.venv/bin/python}
if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "chromium is missing: run 'sudo apt-get update && sudo apt-get install -y chromium'" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi
"$PY" -c "import playwright" 2>/dev/null || "$PY" -m pip install -q --disable-pip-version-check "playwright>=1.45"
