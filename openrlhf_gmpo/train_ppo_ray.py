"""`python -m openrlhf_gmpo.train_ppo_ray [--preset X.yaml [--unset KEY]...] [--backend B] [--dry-run] <OpenRLHF flags>`

Runs OpenRLHF 0.11's own train_ppo_ray (its parser, defaults, validation and training) with our policy losses
accepted by `--actor.policy_loss_type` (gmpo, gmpo_no_clip, gmpo_seq_clip, gmpo_no_norm, grpo, gspo_ours, next to
OpenRLHF's ppo and gspo) and computed inside the policy actor's Ray workers. A preset's keys are OpenRLHF flag
names; flags on the command line override them. `--dry-run` prints the fully resolved command after OpenRLHF's
parser and validation accepted it, without contacting Ray.
"""

import argparse
import sys

from openrlhf_gmpo.openrlhf_plugin.launch import BACKENDS, LaunchPlan, run_openrlhf
from openrlhf_gmpo.openrlhf_plugin.presets import load_preset
from openrlhf_gmpo.openrlhf_plugin.version import check_openrlhf_version


def _launcher_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m openrlhf_gmpo.train_ppo_ray",
        description="OpenRLHF train_ppo_ray with the openrlhf_gmpo policy losses and presets.",
        epilog="Every other flag goes to OpenRLHF's train_ppo_ray (python -m openrlhf.cli.train_ppo_ray --help).",
        allow_abbrev=False,  # never swallow an abbreviated OpenRLHF flag
    )
    parser.add_argument("--preset", help="YAML preset (configs/*.yaml); keys are OpenRLHF flag names")
    parser.add_argument(
        "--backend", choices=BACKENDS, help="policy training backend (default: the preset's, else deepspeed)"
    )
    parser.add_argument("--dry-run", action="store_true", help="validate and print the resolved command; start nothing")
    parser.add_argument(
        "--unset",
        action="append",
        default=[],
        metavar="KEY",
        help="drop this key of the preset (repeatable): how to turn off a switch the preset sets, since OpenRLHF's "
        "switches have no off form (e.g. --unset ds.packing_samples)",
    )
    return parser


def build_plan(argv: list[str] | None = None) -> LaunchPlan:
    """Split our flags from OpenRLHF's and load the preset (no OpenRLHF import yet)."""
    ours, openrlhf_argv = _launcher_parser().parse_known_args(argv)
    preset = load_preset(ours.preset) if ours.preset else {}
    for key in ours.unset:
        if key not in preset:
            where = f"preset {ours.preset}" if ours.preset else "no --preset"
            raise SystemExit(f"--unset {key}: not a key of {where} (keys: {', '.join(preset) or 'none'})")
        del preset[key]
    backend = ours.backend or preset.get("backend", "deepspeed")
    return LaunchPlan(openrlhf_argv, preset, ours.preset, backend, ours.dry_run)


def main(argv: list[str] | None = None) -> LaunchPlan:
    check_openrlhf_version()
    return run_openrlhf(build_plan(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
