"""Run OpenRLHF's own `openrlhf.cli.train_ppo_ray` as `__main__`, with three narrow hooks.

OpenRLHF builds its whole parser, its defaults and its argument validation inside the module's
`if __name__ == "__main__":` block, so they cannot be imported. Copying them would drift from the installed
release; instead we execute the real module with `runpy` and intercept its one `parser.parse_args()` call (recognised
by the calling module's `__spec__`, patched only for the duration of the run). At that point the parser is complete
and `train` is defined, so the hook can:
  1. widen `--actor.policy_loss_type`'s choices with our losses (and add the Megatron flags for --backend megatron),
  2. parse the preset's tokens followed by the user's flags with the real parser,
  3. wrap the module's `train` so that, after OpenRLHF's own validation ran, we validate our part, pick the policy
     actor class, and either start OpenRLHF's training or, for a dry run, print the resolved command and stop.
"""

import argparse
import runpy
import shlex
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field

from openrlhf_gmpo.openrlhf_plugin.loss_adapter import NATIVE_LOSS_TYPES, OUR_LOSS_TYPES
from openrlhf_gmpo.openrlhf_plugin.presets import preset_to_tokens
from openrlhf_gmpo.openrlhf_plugin.version import explain_missing_gpu_modules

OPENRLHF_MODULE = "openrlhf.cli.train_ppo_ray"
BACKENDS = ("deepspeed", "megatron")
LAUNCHER_MODULE = "openrlhf_gmpo.train_ppo_ray"


@dataclass
class LaunchPlan:
    """What to run: preset entries (already loaded), the user's OpenRLHF flags, the backend, dry run or not."""

    openrlhf_argv: list[str]
    preset: dict = field(default_factory=dict)
    preset_source: str | None = None
    backend: str = "deepspeed"
    dry_run: bool = False
    # Filled in by the run: the final token list and OpenRLHF's validated, hierarchized args.
    tokens: list[str] = field(default_factory=list)
    args: object = None

    def command(self) -> str:
        """The fully resolved command line (preset expanded) that reproduces this run."""
        words = ["python3", "-m", LAUNCHER_MODULE, "--backend", self.backend, *self.tokens]
        return shlex.join(words)


def run_openrlhf(plan: LaunchPlan) -> LaunchPlan:
    """Execute OpenRLHF's train_ppo_ray main block under our hooks; returns the plan with tokens/args filled in."""
    if plan.backend not in BACKENDS:
        raise SystemExit(f"openrlhf_gmpo: --backend must be one of {BACKENDS}, got {plan.backend!r}")
    with _intercept_parse_args(lambda parser, parse, module_globals: _on_parse(plan, parser, parse, module_globals)):
        with explain_missing_gpu_modules("OpenRLHF's train_ppo_ray"):
            runpy.run_module(OPENRLHF_MODULE, run_name="__main__")
    if plan.args is None:  # the hook never fired: the installed module no longer has the structure we hook
        raise RuntimeError(f"openrlhf_gmpo: {OPENRLHF_MODULE} finished without calling train(args); unsupported build")
    return plan


@contextmanager
def _intercept_parse_args(on_parse):
    """Route the parse_args call made by OpenRLHF's train_ppo_ray main block to on_parse; others pass through."""
    original = argparse.ArgumentParser.parse_args

    def parse_args(parser, args=None, namespace=None):
        caller = sys._getframe(1).f_globals
        spec = caller.get("__spec__")
        if caller.get("__name__") == "__main__" and spec is not None and spec.name == OPENRLHF_MODULE:
            return on_parse(parser, lambda tokens: original(parser, tokens, namespace), caller)
        return original(parser, args, namespace)

    argparse.ArgumentParser.parse_args = parse_args
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = original


def _on_parse(plan: LaunchPlan, parser, parse, module_globals):
    loss_action = parser._option_string_actions["--actor.policy_loss_type"]
    loss_action.choices = [*NATIVE_LOSS_TYPES, *OUR_LOSS_TYPES]
    if plan.backend == "megatron":
        _megatron_args_module().add_megatron_arguments(parser)

    preset_tokens = preset_to_tokens(plan.preset_source, plan.preset, parser)
    if preset_tokens:
        _check_preset_alone(plan.preset_source, parser, parse, preset_tokens)
        preset_tokens = _yield_to_user_flags(parser, preset_tokens, plan.openrlhf_argv)
    args = parse([*preset_tokens, *plan.openrlhf_argv])
    plan.tokens = last_occurrences(parser, [*preset_tokens, *plan.openrlhf_argv])

    openrlhf_train = module_globals["train"]

    def train(validated_args):
        plan.args = validated_args
        validate_plugin_args(validated_args, plan.backend)
        if plan.dry_run:
            print_dry_run(plan)
            return
        module_globals["PolicyModelActor"] = policy_actor_class(validated_args, plan.backend)
        openrlhf_train(validated_args)

    module_globals["train"] = train
    return args


# A user flag on the left overrides a preset entry on the right that OpenRLHF would otherwise let win: OpenRLHF uses
# --actor.eps_clip only when --actor.eps_clip_low_high is unset, and every preset sets the latter.
PRESET_ENTRIES_OVERRIDDEN_BY = {"actor.eps_clip": "actor.eps_clip_low_high"}


def _yield_to_user_flags(parser, preset_tokens: list[str], user_tokens: list[str]) -> list[str]:
    """The preset's tokens without the entries a user flag is meant to override (PRESET_ENTRIES_OVERRIDDEN_BY)."""
    user_dests = {dest for dest, _ in _flag_segments(parser, user_tokens)}
    dropped = {
        overridden
        for flag, overridden in PRESET_ENTRIES_OVERRIDDEN_BY.items()
        if flag in user_dests and overridden not in user_dests
    }
    kept = [segment for dest, segment in _flag_segments(parser, preset_tokens) if dest not in dropped]
    return [token for segment in kept for token in segment]


def last_occurrences(parser, tokens: list[str]) -> list[str]:
    """The tokens with every flag but its last occurrence dropped (what argparse keeps), for a readable command."""
    last: dict[str, list[str]] = {}
    for dest, segment in _flag_segments(parser, tokens):
        last.pop(dest, None)  # re-inserted last, so the order follows the last occurrences
        last[dest] = segment
    return [token for segment in last.values() for token in segment]


def _flag_segments(parser, tokens: list[str]) -> list[tuple[str, list[str]]]:
    """(dest, [flag, its values...]) per flag occurrence, in order.

    Only called on tokens the parser accepts, so every token is a known flag (or an abbreviation argparse accepts)
    or a value of the flag before it.
    """
    segments: list[tuple[str, list[str]]] = []
    for token in tokens:
        action = _flag_action(parser, token)
        if action is not None:
            segments.append((action.dest, [token]))
        elif segments:
            segments[-1][1].append(token)
    return segments


def _flag_action(parser, token: str):
    """The action a command-line token names: an exact flag, or a unique prefix of one (argparse's abbreviations)."""
    if not token.startswith("--"):
        return None
    name = token.split("=", 1)[0]
    actions = parser._option_string_actions
    if name in actions:
        return actions[name]
    matches = {actions[flag] for flag in actions if flag.startswith(name)}
    return matches.pop() if len(matches) == 1 else None


def _check_preset_alone(source, parser, parse, tokens):
    """Parse the preset's tokens on their own first, so a type or choice error names the preset file."""
    openrlhf_error = parser.error
    parser.error = lambda message: openrlhf_error(f"preset {source}: {message}")
    try:
        parse(tokens)
    finally:
        parser.error = openrlhf_error


def validate_plugin_args(args, backend: str) -> None:
    """Checks OpenRLHF does not make, on its hierarchized args; SystemExit naming the flag and the bad value."""
    low, high = args.actor.eps_clip_low_high
    if not (low > 0 and high > 0):
        raise SystemExit(f"--actor.eps_clip_low_high: both clip bounds must be > 0, got {low} {high}")
    _check_colocated_gpus(args)
    _check_input_template(args.data.input_template)
    if args.actor.policy_loss_type in OUR_LOSS_TYPES:
        if args.actor.dual_clip is not None:
            raise SystemExit(f"--actor.dual_clip {args.actor.dual_clip}: dual clip is a PPO-loss option, not ours")
        if args.actor.loss_agg_mode != "token-mean":
            raise SystemExit(
                f"--actor.loss_agg_mode {args.actor.loss_agg_mode}: our losses aggregate per sequence over the global"
                " batch themselves; leave this flag at its default"
            )
        adv = args.algo.advantage
        if adv.is_correction_level not in ("off", "seq") or adv.is_correction_gating != "ratio":
            raise SystemExit(
                f"--algo.advantage.is_correction_level {adv.is_correction_level} / is_correction_gating "
                f"{adv.is_correction_gating}: our losses support the rollout correction only as level seq with ratio "
                "gating (a per-sequence truncated importance weight capped at the HIGH threshold)"
            )
        if adv.is_correction_level == "seq" and adv.is_correction_mode == "clip":
            # OpenRLHF's own PolicyLoss, still built in every policy worker before ours replaces it, refuses this
            # pair; caught here instead of after the cluster and vLLM have started.
            raise SystemExit(
                "--algo.advantage.is_correction_mode clip: OpenRLHF allows it only with is_correction_level token, "
                "and our losses take level seq; use the default mode (mask)"
            )
        _check_one_advantage_per_sequence(args)
    if backend == "megatron":
        if args.actor.policy_loss_type not in OUR_LOSS_TYPES:
            raise SystemExit(
                f"--actor.policy_loss_type {args.actor.policy_loss_type}: the megatron backend computes our losses "
                f"only ({', '.join(OUR_LOSS_TYPES)}); OpenRLHF's ppo/gspo run on --backend deepspeed"
            )
        _megatron_args_module().validate_megatron_args(args)


def _check_input_template(template: str | None) -> None:
    """OpenRLHF formats each prompt as `template.format(prompt)` when it builds the dataset, inside the trainer actor
    after the vLLM engines have started; its own check (`"{}" in template`) misses other braces."""
    if template is None:
        return
    try:
        template.format("prompt")
    except (IndexError, KeyError, ValueError) as error:
        raise SystemExit(
            f"--data.input_template {template!r}: OpenRLHF fills it with template.format(prompt), which fails here "
            f"({type(error).__name__}: {error}); it needs exactly one {{}}, and literal braces written {{{{ }}}}"
        ) from None


def _check_colocated_gpus(args) -> None:
    """OpenRLHF's own check, made in train() after Ray has started, so that a dry run catches it too."""
    vllm, actor = args.vllm, args.actor
    if args.train.colocate_all and not args.train.async_enable and vllm.num_engines:
        actor_gpus, vllm_gpus = actor.num_nodes * actor.num_gpus_per_node, vllm.num_engines * vllm.tensor_parallel_size
        if actor_gpus != vllm_gpus:
            raise SystemExit(
                f"--train.colocate_all: the vLLM engines must cover exactly the actor's GPUs: --vllm.num_engines "
                f"{vllm.num_engines} x --vllm.tensor_parallel_size {vllm.tensor_parallel_size} = {vllm_gpus}, but "
                f"--actor.num_nodes {actor.num_nodes} x --actor.num_gpus_per_node {actor.num_gpus_per_node} = "
                f"{actor_gpus}"
            )


def _check_one_advantage_per_sequence(args) -> None:
    """Our losses weight a whole sequence by one advantage; refuse the OpenRLHF settings that vary it per token.

    Caught here rather than by the loss's own check, which would fire only after the cluster has started.
    """
    adv, kl = args.algo.advantage, args.algo.kl
    loss = f"--actor.policy_loss_type {args.actor.policy_loss_type}"
    if adv.estimator == "gae":
        raise SystemExit(
            f"--algo.advantage.estimator gae: gives per-token advantages, but {loss} needs one per sequence; use "
            "group_norm (the paper's), rloo, reinforce_baseline or dr_grpo"
        )
    if adv.estimator == "reinforce" and adv.gamma != 1:
        raise SystemExit(
            f"--algo.advantage.gamma {adv.gamma}: with reinforce it discounts returns per token, but {loss} needs one "
            "advantage per sequence; use gamma 1"
        )
    if kl.init_coef > 0 and not kl.use_loss:
        raise SystemExit(
            f"--algo.kl.init_coef {kl.init_coef}: a KL penalty folded into the reward varies per token, but {loss} "
            "needs one advantage per sequence; set "
            "--algo.kl.init_coef 0 (the paper uses no KL) or add --algo.kl.use_loss"
        )


def policy_actor_class(args, backend: str):
    """The Ray actor class OpenRLHF's train() should launch for the policy."""
    if backend == "megatron":
        try:
            from openrlhf_gmpo.megatron.actor import MegatronPolicyActor
        except ImportError as error:
            raise SystemExit(f"--backend megatron: openrlhf_gmpo.megatron.actor is not available ({error})") from None
        if hasattr(MegatronPolicyActor, "remote"):
            return MegatronPolicyActor
        import ray

        return ray.remote(num_gpus=1)(MegatronPolicyActor)
    if args.actor.policy_loss_type in OUR_LOSS_TYPES:
        from openrlhf_gmpo.openrlhf_plugin.actor import GMPOPolicyModelActor

        return GMPOPolicyModelActor
    from openrlhf.trainer.ray.ppo_actor import PolicyModelActor

    return PolicyModelActor


def _megatron_args_module():
    try:
        from openrlhf_gmpo.megatron import args as megatron_args
    except ImportError as error:
        raise SystemExit(f"--backend megatron: openrlhf_gmpo.megatron.args is not available ({error})") from None
    return megatron_args


def print_dry_run(plan: LaunchPlan) -> None:
    args = plan.args
    print(plan.command())
    low, high = args.actor.eps_clip_low_high
    print(
        f"# dry run: validated by OpenRLHF's own parser; backend={plan.backend} "
        f"loss={args.actor.policy_loss_type} clip={low}/{high} estimator={args.algo.advantage.estimator} "
        f"rollout_batch={args.rollout.batch_size}x{args.rollout.n_samples_per_prompt} "
        f"train_batch={args.train.batch_size} lr={args.actor.adam.lr}; Ray not contacted"
    )
