"""The `--megatron.*` flags of `--backend megatron`, in OpenRLHF's dotted style, and their validation.

The launcher calls `add_megatron_arguments(parser)` before parsing and `validate_megatron_args(args)` on the
hierarchized namespace (`args.megatron.tp`, ...). Checks that need the model's numbers (heads, experts, layers) run
again in the actor, against the checkpoint's config, before any GPU memory is used.
"""

from __future__ import annotations

from openrlhf_gmpo.megatron.parallel import ParallelSizes


def add_megatron_arguments(parser) -> None:
    group = parser.add_argument_group("megatron backend (--backend megatron)")
    group.add_argument("--megatron.tp", type=int, default=1, help="tensor parallel size (attention, dense MLP, vocab)")
    group.add_argument("--megatron.pp", type=int, default=1, help="pipeline stages (layers split over ranks)")
    group.add_argument("--megatron.ep", type=int, default=1, help="expert parallel size: experts split over ranks")
    group.add_argument("--megatron.etp", type=int, default=1, help="tensor parallel size inside each expert")
    group.add_argument(
        "--megatron.routing_replay",
        action="store_true",
        default=False,
        help="route each token in the update through the experts the old-policy pass chose",
    )
    group.add_argument(
        "--megatron.router_dtype",
        choices=["fp32", "fp64"],
        default="fp32",
        help="precision of router logits, softmax and top-k",
    )
    group.add_argument(
        "--megatron.recompute",
        action="store_true",
        default=False,
        help="recompute each layer in the backward, keeping only layer inputs (routers replay there too)",
    )
    group.add_argument(
        "--megatron.bf16_grads",
        action="store_true",
        default=False,
        help="accumulate and reduce gradients in bf16 instead of fp32 (halves the gradient buffer)",
    )
    group.add_argument(
        "--megatron.aux_loss_coef",
        type=float,
        default=0.0,
        help="MoE load-balancing loss coefficient (0 = off, the usual choice for RL)",
    )


def megatron_sizes(args) -> ParallelSizes:
    """The parallel sizes the policy actor group will use: one rank per GPU of the actor group."""
    m = args.megatron
    world_size = args.actor.num_nodes * args.actor.num_gpus_per_node
    return ParallelSizes(world_size, tp=m.tp, pp=m.pp, ep=m.ep, etp=m.etp)


def validate_megatron_args(args) -> None:
    """SystemExit naming the flag and value for what the megatron backend cannot do with these arguments."""
    m = args.megatron
    sizes = megatron_sizes(args)
    for name in ("tp", "pp", "ep", "etp"):
        if getattr(m, name) < 1:
            raise SystemExit(f"--megatron.{name} {getattr(m, name)} must be >= 1")
    world = sizes.world_size
    if world % (m.tp * m.pp) or world % (m.etp * m.ep * m.pp):
        raise SystemExit(
            f"--megatron.tp {m.tp} pp {m.pp} ep {m.ep} etp {m.etp}: the actor group's {world} GPUs are not divisible "
            f"by tp*pp = {m.tp * m.pp} and etp*ep*pp = {m.etp * m.ep * m.pp}"
        )
    _check_model(args.actor.model_name_or_path, sizes)
    if m.tp > 1:
        from openrlhf_gmpo.megatron.model import has_transformer_engine

        if not has_transformer_engine():
            raise SystemExit(
                f"--megatron.tp {m.tp}: training with tensor parallelism needs Transformer Engine (megatron-core's "
                "torch norms have no sequence parallelism); install it or use --megatron.tp 1"
            )
    if m.aux_loss_coef < 0:
        raise SystemExit(f"--megatron.aux_loss_coef {m.aux_loss_coef} must be >= 0")
    if m.routing_replay and m.tp > 1:
        raise SystemExit(
            f"--megatron.routing_replay with --megatron.tp {m.tp}: replay needs tp 1 (TP training uses "
            "sequence parallelism, which splits each sequence's routing over the TP ranks)"
        )
    # OpenRLHF gives consecutive groups of ds.tensor_parallel_size * ring_attn_size actors the same data chunk; that
    # must be megatron's data-parallel replica, the tp consecutive ranks of one model copy.
    duplicates = args.ds.tensor_parallel_size * args.ds.ring_attn_size
    if duplicates != m.tp:
        raise SystemExit(
            f"--ds.tensor_parallel_size {args.ds.tensor_parallel_size} x --ds.ring_attn_size {args.ds.ring_attn_size}"
            f" must equal --megatron.tp {m.tp}, so OpenRLHF sends each megatron data-parallel replica one chunk"
        )
    per_rank = args.train.batch_size / sizes.dp
    if per_rank != int(per_rank) or int(per_rank) % args.train.micro_batch_size:
        raise SystemExit(
            f"--train.batch_size {args.train.batch_size}: must split into {sizes.dp} data-parallel ranks of whole "
            f"--train.micro_batch_size {args.train.micro_batch_size} micro-batches"
        )
    unsupported = {
        "--ds.packing_samples": args.ds.packing_samples,
        "--train.dynamic_batch_enable": args.train.dynamic_batch_enable,
        "--train.enable_ema": args.train.enable_ema,
        "--ds.lora.rank": args.ds.lora.rank,
        "--actor.entropy_coef": args.actor.entropy_coef,
        "--algo.kl.use_loss": args.algo.kl.use_loss and args.algo.kl.init_coef > 0,
        "--actor.aux_loss_coef (use --megatron.aux_loss_coef)": args.actor.aux_loss_coef,
        # Weights reach vLLM by NCCL broadcast or CUDA IPC (vllm_sync), not through Ray collectives.
        "--vllm.sync_with_ray": getattr(args.vllm, "sync_with_ray", False),
    }
    for flag, value in unsupported.items():
        if value:
            raise SystemExit(f"{flag} {value}: not supported by the megatron backend")


def _check_model(model: str, sizes: ParallelSizes) -> None:
    """What the backend cannot build from the model's config, before the cluster starts: parallel sizes that do not
    divide its heads, experts, layers or vocab, or an architecture it does not map (rope scaling, biases, dense
    layers in an MoE). Checked when the config is local or in the HF cache; otherwise the actor checks it after the
    download, before building the model."""
    from transformers import AutoConfig

    from openrlhf_gmpo.megatron.model import transformer_config_kwargs

    try:
        config = AutoConfig.from_pretrained(model, local_files_only=True)  # no network from the launcher
    except (OSError, ValueError):
        return
    try:
        transformer_config_kwargs(config, sizes)
    except ValueError as error:
        raise SystemExit(f"--actor.model_name_or_path {model}: {error}") from error
