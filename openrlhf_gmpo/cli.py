"""`openrlhf-gmpo` console entry point: one subcommand per job, each living in its own module.

Each module named in SUBCOMMANDS exposes `register(subparsers)`, which adds its parser and sets `func`
(called with the parsed namespace; its return value is the exit code). Those modules keep heavy imports (torch,
transformers, ray) inside the functions that need them, so `openrlhf-gmpo --help` answers at once.
"""

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "demo": "openrlhf_gmpo.demo",
    "countdown": "openrlhf_gmpo.countdown.cli",
    "stability": "openrlhf_gmpo.stability.cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openrlhf-gmpo", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in SUBCOMMANDS.values():
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
