#!/usr/bin/env bash
# Create .venv (if missing) and install deltalog with its test extras into it.
# Used by samples/demo.sh and .ci/run so both start from nothing the same way.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "deltalog needs Python 3.11+" >&2; exit 1; }
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
