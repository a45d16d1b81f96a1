#!/usr/bin/env bash
# Create .venv (if missing) and install deltalog with its test extras into it.
# Used by samples/demo.sh and .ci/run so both start from nothing the same way.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "deltalog needs Python 3.11+" >&2; exit 1; }
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
# An editable install is not byte-compiled, and where PYTHONDONTWRITEBYTECODE is set (CI images, this
# project's containers) Python never caches the bytecode itself: every command would compile the ~35
# modules it loads from source, ~50 ms a command (issue 15). Compile them once here; an edited
# module's stale .pyc is simply ignored (compiled in memory) until the next setup.
.venv/bin/python -m compileall -q src/deltalog
