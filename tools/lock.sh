#!/usr/bin/env bash
# Rewrites constraints.lock: a fresh install from constraints.txt alone (newest releases of everything it leaves
# open), every installed package pinned. Run the suite on the result before committing it.
#
#   bash tools/lock.sh && make test
set -euo pipefail
cd "$(dirname "$0")/.."

venv=$(mktemp -d /tmp/openrlhf-gmpo-lock.XXXXXX)
trap 'rm -rf "$venv"' EXIT
UNLOCKED=1 VENV="$venv" bash tools/install.sh
{
  echo "# Every package of the install, pinned: written by tools/lock.sh on $(date -u +%Y-%m-%d); do not edit by hand."
  echo "# tools/install.sh uses it beside constraints.txt (the pins we chose, with reasons)."
  "$venv/bin/python" -m pip freeze --all --exclude-editable # --all: pip, setuptools and wheel too
} >constraints.lock
echo "lock.sh: constraints.lock pins $(grep -vc '^#' constraints.lock) packages"
