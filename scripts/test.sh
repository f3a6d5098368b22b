#!/bin/bash
# Run the whole test suite (the README's second command). Any failure, and "no tests ran", fail it.
set -uo pipefail
cd "$(dirname "$0")/.."
# A test that may take longer says so with @pytest.mark.timeout(N), which wins over this default.
.venv/bin/python -m pytest -q --timeout=300 "$@"
status=$?
if [ $status -eq 5 ]; then
    echo "test.sh: pytest collected no tests" >&2
fi
exit $status
