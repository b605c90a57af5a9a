"""One Qwen3-30B-A3B-shaped MoE layer, fwd+bwd: HF eager / grouped_mm, megatron-core local spec, our GroupedExperts.

    python bench/bench_moe_layer.py                          # one H100: hidden 2048, 128 experts, top-8, FFN 768
    python bench/bench_moe_layer.py --device cpu --small     # a few seconds on CPU: checks that every case runs

Every implementation gets the same router, expert weights and tokens. HF's router runs in the model dtype and
megatron's in fp32, so in bf16 a few % of tokens choose a different top-k expert set; the check columns give the share
of tokens whose set agrees with HF eager's and the largest output difference from HF eager over those tokens only.
Routing is "even" (random router, near-uniform load) or "uneven": each expert's logits get a bias beta*log(p_e),
p ~ Dirichlet(1), through a constant direction added to every token; the measured max/mean tokens per expert is printed.
TFLOP/s counts expert GEMM work only:

    FLOP = 3 (fwd + 2x bwd) * tokens * top_k * (2*H*2F + 2*F*H) = 18 * tokens * top_k * H * F

(1.86e12 at full size), and is compared with a dense bf16 N x N x N matmul (2*N^3 FLOP, N = 8192) timed in the same run,
before and after the MoE cases; the higher of the two rates is the denominator of the goal.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from common import dense_matmul_tflops, device_name, fmt, require_device, run_and_report, time_ms

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Shape:
    hidden: int
    experts: int
    top_k: int
    ffn: int
    tokens: int
    dense_n: int  # the dense matmul reference size

    @property
    def expert_flop(self) -> float:
        """fwd+bwd FLOP of the expert GEMMs: 3 passes x 2 GEMMs (fc1 is 2F wide) per routed token."""
        return 18.0 * self.tokens * self.top_k * self.hidden * self.ffn


FULL = Shape(hidden=2048, experts=128, top_k=8, ffn=768, tokens=8192, dense_n=8192)
SMALL = Shape(hidden=64, experts=8, top_k=2, ffn=32, tokens=256, dense_n=256)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
UNEVEN_BIAS = 0.3  # beta: 0.3 gives a max/mean load of a few x at full size, like an early-RL router


def fwd_bwd_step(module, inputs: torch.Tensor, grad_out: torch.Tensor):
    """One forward+backward, input gradient included (a layer inside a model must produce it); grads are set to None
    first so every step allocates them the same way."""
    inputs = inputs.detach().requires_grad_()
    params = [p for p in module.parameters() if p.requires_grad]

    def step():
        for tensor in (*params, inputs):
            tensor.grad = None
        output = module(inputs)
        output = output[0] if isinstance(output, tuple) else output
        output.backward(grad_out.view_as(output))

    return step


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def init_megatron(device: str) -> None:
    """A one-process world with megatron-core's parallel state (TP = EP = 1); CPU gets the test-only shims."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if device == "cpu":
        sys.path.insert(0, str(REPO / "tests"))
        import helpers_megatron

        helpers_megatron.install_cpu_shims()
    if not torch.distributed.is_initialized():
        # A one-process world needs no rendezvous port: an in-process store cannot collide with other jobs' ports
        # (a MASTER_PORT left in the environment by a caller once did).
        backend = "nccl" if device == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=1)
    # megatron's attention forks its model-parallel RNG even without dropout; on CPU the inference tracker holds it.
    model_parallel_cuda_manual_seed(0, inference_rng_tracker=device == "cpu")


def megatron_config(shape: Shape, device: str, dtype: torch.dtype, num_layers: int = 1, **overrides):
    """Qwen3-MoE experts as megatron-core configures them: SwiGLU, no biases, fp32 router, no aux loss."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = dict(
        num_layers=num_layers,
        hidden_size=shape.hidden,
        num_attention_heads=max(1, shape.hidden // 128),
        ffn_hidden_size=shape.ffn * 8,
        moe_ffn_hidden_size=shape.ffn,
        num_moe_experts=shape.experts,
        moe_router_topk=shape.top_k,
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type="alltoall",
        gated_linear_unit=True,
        activation_func=F.silu,
        bias_activation_fusion=False,  # as the backend builds it (megatron/model.py): SequentialMLP's unfused SwiGLU
        add_bias_linear=False,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=device == "cpu",
    )
    return TransformerConfig(**{**fields, **overrides})


def moe_layer_spec(num_experts: int, grouped: bool):
    """megatron-core's local MoE layer spec, with GroupedExperts in place of SequentialMLP when `grouped`."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from openrlhf_gmpo.megatron.grouped_experts import grouped_experts_submodule

    layer_spec = get_gpt_layer_local_spec(
        num_experts=num_experts, moe_grouped_gemm=False, qk_layernorm=True, normalization="RMSNorm"
    )
    if grouped:
        moe = layer_spec.submodules.mlp
        moe.keywords["submodules"] = replace(moe.keywords["submodules"], experts=grouped_experts_submodule())
    return layer_spec


def make_problem(shape: Shape, routing: str, seed: int = 0):
    """Router weight [E, H], fc1 [E, 2F, H] (gate then up), fc2 [E, H, F] and tokens [T, H], all fp32 on CPU."""
    generator = torch.Generator().manual_seed(seed)
    h, e, f, t = shape.hidden, shape.experts, shape.ffn, shape.tokens
    router = torch.randn(e, h, generator=generator) * h**-0.5  # logits ~ N(0, 1)
    fc1 = torch.randn(e, 2 * f, h, generator=generator) * h**-0.5
    fc2 = torch.randn(e, h, f, generator=generator) * f**-0.5
    tokens = torch.randn(t, h, generator=generator)
    if routing == "uneven":
        popularity = torch.distributions.Dirichlet(torch.ones(e)).sample()  # global RNG, seeded in main
        direction = torch.randn(h, generator=generator)
        direction /= direction.norm()
        shift = 8.0  # every token gets ~8 along `direction`, so the router adds ~beta*log(p_e) to expert e's logit
        tokens += shift * direction
        router += UNEVEN_BIAS * torch.log(popularity)[:, None] / shift * direction[None]
    elif routing != "even":
        raise ValueError(f"routing must be 'even' or 'uneven', got {routing!r}")
    return router, fc1, fc2, tokens


def routing_of(router: torch.Tensor, tokens: torch.Tensor, top_k: int):
    """Tokens per expert and the topk choice, as HF and megatron compute it (softmax, top-k, renormalise)."""
    probs = torch.softmax(tokens @ router.T, dim=-1)
    top_probs, top_experts = probs.topk(top_k, dim=-1)
    counts = torch.bincount(top_experts.flatten(), minlength=router.shape[0])
    return counts, top_probs / top_probs.sum(-1, keepdim=True)


def hf_block(shape: Shape, weights, implementation: str, device: str, dtype: torch.dtype):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    config = Qwen3MoeConfig(
        hidden_size=shape.hidden,
        moe_intermediate_size=shape.ffn,
        num_experts=shape.experts,
        num_experts_per_tok=shape.top_k,
        norm_topk_prob=True,
        experts_implementation=implementation,
    )
    router, fc1, fc2 = weights
    block = Qwen3MoeSparseMoeBlock(config)
    with torch.no_grad():
        block.gate.weight.copy_(router)
        block.experts.gate_up_proj.copy_(fc1)
        block.experts.down_proj.copy_(fc2)
    return block.to(device, dtype)


def megatron_state_dict(weights, prefix: str = "") -> dict:
    router, fc1, fc2 = weights
    state = {f"{prefix}router.weight": router}
    for index in range(fc1.shape[0]):
        state[f"{prefix}experts.local_experts.{index}.linear_fc1.weight"] = fc1[index]
        state[f"{prefix}experts.local_experts.{index}.linear_fc2.weight"] = fc2[index]
    return state


def megatron_moe_layer(shape: Shape, weights, grouped: bool, device: str, dtype: torch.dtype):
    from megatron.core.process_groups_config import ProcessGroupCollection

    config = megatron_config(shape, device, dtype)
    layer = moe_layer_spec(shape.experts, grouped).submodules.mlp(
        config=config, pg_collection=ProcessGroupCollection.use_mpu_process_groups()
    )
    missing, unexpected = layer.load_state_dict(megatron_state_dict(weights), strict=False)
    if unexpected or any(not key.endswith("_extra_state") for key in missing):
        raise RuntimeError(f"weights do not fit megatron's MoELayer: missing {missing}, unexpected {unexpected}")
    layer = layer.to(device)
    if grouped and device == "cpu":
        layer.experts.run_grouped_on_cpu = True  # measure the grouped path, not the CPU fallback
    return layer


def add_timed_row(rows: list, case: str, step, shape, device: str, warmup: int, iters: int, **fields) -> None:
    """One fwd+bwd case: its time, expert-GEMM TFLOP/s and peak memory (counted from a fresh start), added to `rows`
    and then logged (a line in the log even if the process is killed later)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ms = time_ms(step, device, warmup, iters)
    rows.append(dict(case=case, ms=ms, tflops=shape.expert_flop / ms / 1e9, **fields, peak_gib=peak_gib(device)))
    print(f"measured {case} ({fields['routing']}): {ms:.3f} ms", flush=True)


def chosen_experts(module, inputs: torch.Tensor, experts: int) -> torch.Tensor:
    """[tokens, experts] bool: where the module's own router sends each token (HF's gate or megatron's router)."""
    if hasattr(module, "gate"):
        _, _, indices = module.gate(inputs.reshape(-1, inputs.shape[-1]))
        chosen = torch.zeros(indices.shape[0], experts, dtype=torch.bool, device=indices.device)
        return chosen.scatter_(1, indices, True)
    return module.router(inputs)[1].bool()


def run(args, result: dict) -> None:
    shape = SMALL if args.small else FULL
    device, dtype = args.device, DTYPES[args.dtype]
    result.update(shape=shape.__dict__, device=device_name(device), dtype=str(dtype), rows=[])
    rows = result["rows"]
    torch.manual_seed(0)
    init_megatron(device)
    warmup, iters = (1, 3) if args.small else (3, 10)
    dense_warmup_s = 0.1 if args.small else 0.75

    def dense_row(when: str) -> dict:
        tflops = dense_matmul_tflops(shape.dense_n, device, dtype, dense_warmup_s)
        case = f"dense matmul {shape.dense_n}^3, {when}"
        return dict(case=case, routing="-", ms=2 * shape.dense_n**3 / tflops / 1e9, tflops=tflops)

    rows.append(dense_row("before"))
    for routing in ("even", "uneven"):
        router, fc1, fc2, tokens = make_problem(shape, routing)
        weights = (router, fc1, fc2)
        counts, _ = routing_of(router, tokens, shape.top_k)
        load = (counts.max() / counts.float().mean()).item()
        empty = int((counts == 0).sum())
        routed = dict(routing=routing, load_max_over_mean=load, empty_experts=empty)  # recorded with every case
        x = tokens.to(device, dtype)
        grad = torch.randn(shape.tokens, shape.hidden, generator=torch.Generator().manual_seed(7)).to(device, dtype)

        layers = {
            "HF Qwen3MoeSparseMoeBlock eager": lambda w=weights: hf_block(shape, w, "eager", device, dtype),
            "HF Qwen3MoeSparseMoeBlock grouped_mm": lambda w=weights: hf_block(shape, w, "grouped_mm", device, dtype),
            "megatron MoELayer, SequentialMLP": lambda w=weights: megatron_moe_layer(shape, w, False, device, dtype),
            "megatron MoELayer, GroupedExperts": lambda w=weights: megatron_moe_layer(shape, w, True, device, dtype),
        }
        reference = None
        for name, build in layers.items():
            module = build()
            hf = name.startswith("HF")
            shaped = x.view(1, shape.tokens, shape.hidden) if hf else x.view(shape.tokens, 1, shape.hidden)
            with torch.no_grad():
                out = module(shaped)
                out = (out[0] if isinstance(out, tuple) else out).reshape(shape.tokens, shape.hidden).float()
                chosen = chosen_experts(module, shaped, shape.experts)
            reference = (out, chosen) if reference is None else reference
            same = (chosen == reference[1]).all(-1)  # tokens sent to the same expert set as by HF eager
            diff = (out - reference[0])[same].abs().max().item() if same.any() else None
            check = dict(topk_agreement_vs_hf_eager=same.float().mean().item(), max_abs_diff_vs_hf_eager_same_topk=diff)
            step = fwd_bwd_step(module, shaped, grad)
            add_timed_row(rows, name, step, shape, device, warmup, iters, **routed, **check)
            del module

        # The experts alone, on tokens already sorted by expert, as the dispatcher hands them over: first with the
        # weights laid out as GroupedExperts keeps them, then each in its own memory (as code that re-homes parameters
        # one by one leaves them), which costs a torch.stack copy of all expert weights per GEMM.
        experts = expert_module(shape, weights, device, dtype)
        permuted = torch.randn(int(counts.sum()), shape.hidden, device=device, dtype=dtype)
        probs = torch.rand(int(counts.sum()), device=device)
        grad_permuted = torch.randn_like(permuted)
        bound = _BoundExperts(experts, counts.to(device), probs)
        for case in ("GroupedExperts alone", "GroupedExperts alone, scattered weights"):
            if case.endswith("scattered weights"):
                for param in experts.parameters():
                    param.data = param.data.clone()
            step = fwd_bwd_step(bound, permuted, grad_permuted)
            add_timed_row(rows, case, step, shape, device, warmup, iters, **routed)
        del experts, bound
    rows.append(dense_row("after"))  # the MoE runs may have warmed (or throttled) the GPU since the first one


def summarise(result: dict) -> None:
    """Rates as a fraction of the dense matmul's (the higher of its two runs: the goal is then harder to meet), and
    the goals whose cases were measured."""
    rows = result.get("rows", [])
    dense = max((row["tflops"] for row in rows if row["case"].startswith("dense")), default=None)
    result["dense_tflops"] = dense
    for row in rows:
        row["fraction_of_dense"] = row["tflops"] / dense if dense else None
    result["goals"] = goals(rows)


class _BoundExperts(torch.nn.Module):
    """The experts module with this batch's routing bound, so the timing helper can call it with the tokens alone."""

    def __init__(self, experts, tokens_per_expert, probs):
        super().__init__()
        self.experts, self.tokens_per_expert, self.probs = experts, tokens_per_expert, probs

    def forward(self, hidden):
        return self.experts(hidden, self.tokens_per_expert, self.probs)


def expert_module(shape: Shape, weights, device: str, dtype: torch.dtype):
    from megatron.core.process_groups_config import ProcessGroupCollection

    from openrlhf_gmpo.megatron.grouped_experts import grouped_experts_submodule

    experts = grouped_experts_submodule()(
        shape.experts,
        megatron_config(shape, device, dtype),
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
    )
    state = {k.removeprefix("experts."): v for k, v in megatron_state_dict(weights).items() if k.startswith("experts.")}
    missing, unexpected = experts.load_state_dict(state, strict=False)
    if unexpected or any(not key.endswith("_extra_state") for key in missing):
        raise RuntimeError(f"weights do not fit GroupedExperts: missing {missing}, unexpected {unexpected}")
    experts = experts.to(device)
    experts.run_grouped_on_cpu = True
    return experts


def goals(rows) -> list[dict]:
    """Issue 7's goals, per routing, for the cases that were measured (a stopped run may lack some)."""
    result = []
    for routing in ("even", "uneven"):
        by_case = {row["case"]: row for row in rows if row["routing"] == routing}
        ours = by_case.get("megatron MoELayer, GroupedExperts", {}).get("tflops")
        hf = by_case.get("HF Qwen3MoeSparseMoeBlock grouped_mm", {}).get("tflops")
        sequential = by_case.get("megatron MoELayer, SequentialMLP", {}).get("tflops")
        alone = by_case.get("GroupedExperts alone", {}).get("fraction_of_dense")
        vs_hf = ours / hf if ours and hf else None
        vs_sequential = ours / sequential if ours and sequential else None
        measured = {
            "megatron MoE layer >= 2x HF grouped_mm": (vs_hf, 2.0),
            # 2x the 164 TFLOP/s that HF grouped_mm reached on one H100 before this work (torch 2.11)
            "megatron MoE layer TFLOP/s >= 330": (ours, 330.0),
            "megatron MoE layer >= 16x today's SequentialMLP": (vs_sequential, 16.0),
            "GroupedExperts alone >= 50% of dense": (alone, 0.5),
        }
        for goal, (value, target) in measured.items():
            if value is not None:
                result.append(dict(goal=f"{goal} ({routing})", measured=value, target=target, met=value >= target))
    return result


def print_table(result: dict) -> None:
    if "shape" not in result:
        return  # stopped before anything was set up
    print(f"device: {result['device']}  dtype: {result['dtype']}  shape: {result['shape']}")
    header = f"{'case':42} {'routing':8} {'ms':>9} {'TFLOP/s':>9} {'x dense':>8} {'max/mean':>8} "
    header += f"{'same top-k':>10} {'|diff| same':>11} {'GiB':>6}"
    print(header)
    print("-" * len(header))
    for row in result["rows"]:
        print(
            f"{row['case']:42} {row['routing']:8} {row['ms']:9.3f} {row['tflops']:9.3f} "
            f"{fmt(row['fraction_of_dense'], '.3f'):>8} {fmt(row.get('load_max_over_mean'), '.2f'):>8} "
            f"{fmt(row.get('topk_agreement_vs_hf_eager'), '.2%'):>10} "
            f"{fmt(row.get('max_abs_diff_vs_hf_eager_same_topk'), '.2e'):>11} {fmt(row.get('peak_gib'), '.1f'):>6}"
        )
    print("same top-k: share of tokens sent to the same expert set as by HF eager (routers: HF in the model dtype,")
    print("megatron in fp32); |diff| same: largest |output - HF eager's| over those tokens only")
    print(f"x dense: over the higher of the dense matmul's runs, {fmt(result['dense_tflops'], '.2f')} TFLOP/s")
    if result["shape"] != FULL.__dict__:
        print("goals are set for the full shape on one H100; at this shape they only show that the checks run")
    for goal in result["goals"]:
        print(f"goal: {goal['goal']}: measured {goal['measured']:.2f}, {'met' if goal['met'] else 'NOT met'}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--small", action="store_true", help="tiny shape (hidden 64, 8 experts) to check on CPU")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="fp32 checks the |diff| column")
    parser.add_argument("--json", default="bench_moe_layer.json", help="where to write the results")
    args = parser.parse_args(argv)
    require_device(args.device)
    return run_and_report(run, summarise, print_table, args)


if __name__ == "__main__":
    sys.exit(main())
