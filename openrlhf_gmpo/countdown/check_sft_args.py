"""`python -m openrlhf_gmpo.countdown.check_sft_args <train_sft flags>`: validate flags with OpenRLHF's own parser.

openrlhf.cli.train_sft builds its parser, hierarchizes the dotted flags and runs its checks inside
`if __name__ == "__main__":`, then calls train(args), whose first statement is `get_strategy(args)`. We run that
module as __main__ with `openrlhf.utils.get_strategy` swapped for a function that stops the run and hands back the
parsed namespace: every step before training is OpenRLHF's real code, and nothing is built or trained.
(Importing the module needs `openrlhf.models`, hence flash-attn's CUDA build: run it on a GPU node; the CPU tests
use the import stubs in tests/stub_site.)
"""

import runpy
import sys
from types import SimpleNamespace


class _Parsed(Exception):
    def __init__(self, namespace):
        super().__init__("train_sft arguments parsed")
        self.namespace = namespace


def _stop(args):
    raise _Parsed(args)


def parse_train_sft_args(argv: list[str]) -> SimpleNamespace:
    """The hierarchized namespace OpenRLHF's train_sft would train with; argparse errors exit with status 2."""
    import openrlhf.utils

    from openrlhf_gmpo.openrlhf_plugin.version import explain_missing_gpu_modules

    saved_argv, saved_get_strategy = sys.argv, openrlhf.utils.get_strategy
    sys.argv = ["openrlhf.cli.train_sft", *argv]
    openrlhf.utils.get_strategy = _stop
    try:
        with explain_missing_gpu_modules("OpenRLHF's train_sft"):
            runpy.run_module("openrlhf.cli.train_sft", run_name="__main__")
    except _Parsed as parsed:
        return parsed.namespace
    finally:
        sys.argv, openrlhf.utils.get_strategy = saved_argv, saved_get_strategy
    raise RuntimeError("openrlhf.cli.train_sft finished without calling get_strategy: its entry point has changed")


def main(argv: list[str] | None = None) -> int:
    args = parse_train_sft_args(sys.argv[1:] if argv is None else argv)
    print(
        "train_sft flags OK:",
        f"model={args.model.model_name_or_path}",
        f"dataset={args.data.dataset}",
        f"batch={args.train.batch_size}/{args.train.micro_batch_size}",
        f"epochs={args.train.max_epochs}",
        f"lr={args.adam.lr}",
        f"output={args.ckpt.output_dir}",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
