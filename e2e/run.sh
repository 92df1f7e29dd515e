#!/usr/bin/env bash
# End-to-end test on a kind cluster. Needs docker (a running engine), kind, kubectl, helm;
# without them it says what is missing and exits 0, as skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"  # helm from `make install`
missing=()
for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
if command -v docker >/dev/null && ! docker info >/dev/null 2>&1; then
  missing+=("a running Docker engine")
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "e2e skipped: missing ${missing[*]}"
  exit 0
fi
make install
exec .venv/bin/python -m pytest -v e2e/test_kind.py "$@"
