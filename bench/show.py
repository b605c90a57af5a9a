"""Print a bench's JSON as the bench printed its table, without measuring anything.

The device tool returns only the last 12,000 characters of a command's output, so the tables printed early in a
GPU call can be cut; the JSON files come back whole. This prints them for docs/benchmarks.md:

    python bench/show.py FILES_AT/moe_layer.json FILES_AT/losses.json FILES_AT/profile_moe_layer.json
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench scripts, importable by name
PRINTERS = {"profile_moe_layer": "print_report"}  # every other bench calls it print_table


def show(path: Path) -> None:
    result = json.loads(path.read_text())
    bench = result.get("bench")
    if not (Path(__file__).resolve().parent / f"{bench}.py").is_file():
        raise SystemExit(f"{path}: 'bench' is {bench!r}, not a script in bench/ (JSON written by another tool?)")
    print(f"== {path} ({bench})")
    if result["partial"]:
        print(f"PARTIAL RESULT: {result['partial']}")
    getattr(importlib.import_module(bench), PRINTERS.get(bench, "print_table"))(result)


def main(argv: list[str]) -> int:
    if not argv:
        raise SystemExit(__doc__)
    for path in map(Path, argv):
        show(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
