#!/bin/bash
# Run the whole test suite (the README's second command). Any failure, and "no tests ran", fail it.
set -uo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest -q --timeout=600 "$@"
status=$?
if [ $status -eq 5 ]; then
    echo "test.sh: pytest collected no tests" >&2
fi
exit $status
