"""Qwen3-30B-A3B-width models (random weights) of 1 and 4 layers, fwd+bwd: HF vs the megatron backend, tokens/s and MFU.

    python bench/bench_moe_model.py                          # one H100: 4 x 2048 tokens, vocab 151936
    python bench/bench_moe_model.py --device cpu --small     # seconds on CPU: checks that every case runs

One decoder layer's time is measured as (t[4 layers] - t[1 layer]) / 3, which removes the embedding, LM head and loss.
The megatron side is `openrlhf_gmpo.megatron.model.build_gpt_model` (GroupedExperts on CUDA without Transformer Engine,
SequentialMLP on CPU), loaded with the HF model's weights through `openrlhf_gmpo.megatron.weights`; the table shows the
largest per-token log-prob difference from HF eager as a check. If that backend is not importable, HF runs alone.
The two sides may run different attention: HF's default is SDPA (flash on an H100), megatron's is the class the
backend's spec puts in core_attention (megatron's local DotProductAttention materialises a [heads, S, S] softmax; the
backend's SDPAttention calls SDPA). Each row records its attention, and "HF experts=grouped_mm, attn=eager" is HF with
unfused attention, so that some HF row differs from the megatron row in the experts only.

FLOP per token (fwd+bwd, matmuls only; causal attention scores/values averaged over the sequence):
    6 * N_active + 6 * L * S * (heads * head_dim)
    N_active = L * (H*(heads + 2*kv_heads)*head_dim + heads*head_dim*H + H*E + top_k*3*H*F) + H*V
MFU = FLOP/token x tokens/s / --peak-tflops (default: the device's dense bf16 peak where known, see
peak_bf16_tflops); "x dense" divides by the dense bf16 matmul rate measured in the same run (before and after the
models; the higher one) instead.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from dataclasses import dataclass

import torch
from bench_moe_layer import init_megatron, peak_gib
from common import dense_matmul_tflops, device_name, fmt, require_device, run_and_report, time_ms


def peak_bf16_tflops(device: str) -> float | None:
    """Dense bf16 peak TFLOP/s from NVIDIA's datasheets for the GPUs we run on; None for any other device (NVL cards
    included): pass --peak-tflops."""
    name = device.upper()
    if "NVL" in name:
        return None
    if "H100" in name:
        return 756.0 if "PCIE" in name else 989.0  # the SXM card reports itself as "H100 80GB HBM3"
    return 989.0 if "H200" in name else None


@dataclass(frozen=True)
class ModelShape:
    vocab: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int  # dense FFN size in the HF config (unused by all-MoE layers, required by both configs)
    expert_ffn: int
    experts: int
    top_k: int
    batch: int
    seq: int
    dense_n: int

    def hf_config(self, layers: int, experts_implementation: str):
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.ffn,
            moe_intermediate_size=self.expert_ffn,
            num_hidden_layers=layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim,
            num_experts=self.experts,
            num_experts_per_tok=self.top_k,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            tie_word_embeddings=False,
            max_position_embeddings=max(4096, self.seq),
            experts_implementation=experts_implementation,
        )

    def flop_per_token(self, layers: int) -> float:
        h, attn = self.hidden, self.heads * self.head_dim
        per_layer = h * (self.heads + 2 * self.kv_heads) * self.head_dim + attn * h + h * self.experts
        per_layer += self.top_k * 3 * h * self.expert_ffn
        active = layers * per_layer + h * self.vocab
        return 6.0 * active + 6.0 * layers * self.seq * attn


FULL = ModelShape(151936, 2048, 32, 4, 128, 6144, 768, 128, 8, batch=4, seq=2048, dense_n=8192)
SMALL = ModelShape(64, 64, 4, 2, 16, 128, 32, 8, 2, batch=2, seq=64, dense_n=256)


def hf_model(shape: ModelShape, layers: int, experts: str, attention: str | None, device: str, dtype: torch.dtype):
    """attention None: HF's default (SDPA)."""
    from transformers import Qwen3MoeForCausalLM

    from openrlhf_gmpo.countdown.model import to_low_precision

    config = shape.hf_config(layers, experts)
    if attention is not None:
        config._attn_implementation = attention
    torch.manual_seed(0)  # the same random weights for every implementation of a given depth
    with torch.device(device):  # random init of ~3B parameters where they will run, not on the host first
        model = Qwen3MoeForCausalLM(config)
    with torch.no_grad():  # HF leaves the router at zero: every token would tie; give it a random one
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(0.0, shape.hidden**-0.5)
    # RoPE frequencies stay fp32, as in megatron: in bf16 the angles at position ~2000 would be off by radians.
    return to_low_precision(model, dtype).train()


def hf_log_probs(model, input_ids):
    logits = model(input_ids=input_ids).logits[:, :-1].float()
    return -torch.nn.functional.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")  # [B, S-1]


def megatron_model(hf, shape: ModelShape, layers: int, device: str, dtype: torch.dtype):
    from openrlhf_gmpo.megatron.model import build_gpt_model
    from openrlhf_gmpo.megatron.parallel import ParallelSizes
    from openrlhf_gmpo.megatron.weights import load_hf_weights

    model = build_gpt_model(hf.config, ParallelSizes(world_size=1), params_dtype=dtype)
    load_hf_weights(model, {name: tensor.to(device) for name, tensor in hf.state_dict().items()}, hf.config)
    return model.to(device).train()


def megatron_log_probs(model, input_ids):
    from openrlhf_gmpo.megatron.logprobs import token_log_probs

    return token_log_probs(model, input_ids, torch.ones_like(input_ids, dtype=torch.bool))


def loss_step(model, log_probs_fn, input_ids):
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        for param in params:
            param.grad = None
        (-log_probs_fn(model, input_ids).mean()).backward()

    return step


CASES = (  # name, HF experts implementation, HF attention (None: SDPA); the megatron model is loaded from HF eager's
    ("HF experts=eager", "eager", None),
    ("HF experts=grouped_mm", "grouped_mm", None),
    ("HF experts=grouped_mm, attn=eager", "grouped_mm", "eager"),  # unfused, like megatron's DotProductAttention
    ("megatron", "eager", None),
)


def run(args, result: dict) -> None:
    shape = SMALL if args.small else FULL
    device, dtype = args.device, torch.bfloat16
    peak = args.peak_tflops or peak_bf16_tflops(device_name(device))
    peak_from = "--peak-tflops" if args.peak_tflops else "the device name"
    result.update(shape=shape.__dict__, device=device_name(device), dtype=str(dtype), rows=[])
    result.update(peak_tflops=peak, peak_tflops_from=peak_from)
    result.update(dense_tflops_measured=[], notes=[])
    rows, notes = result["rows"], result["notes"]
    warmup, iters = (1, 2) if args.small else (2, 5)
    init_megatron(device)
    dense_warmup_s = 0.1 if args.small else 0.75
    result["dense_tflops_measured"].append(dense_matmul_tflops(shape.dense_n, device, dtype, dense_warmup_s))
    input_ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=torch.Generator().manual_seed(1))
    input_ids = input_ids.to(device)
    tokens = shape.batch * shape.seq
    megatron_ok = True
    for layers in (1, 4):
        reference = None
        for name, experts, hf_attention in CASES:
            if name == "megatron" and not megatron_ok:
                continue
            hf = hf_model(shape, layers, experts, hf_attention, device, dtype)
            model, fn, attention = hf, hf_log_probs, hf.config._attn_implementation
            if name == "megatron":
                try:
                    model, fn = megatron_model(hf, shape, layers, device, dtype), megatron_log_probs
                except Exception:  # report and keep the HF numbers: the backend is another engineer's moving part
                    megatron_ok = False
                    notes.append("megatron backend unavailable, HF only:\n" + traceback.format_exc(limit=3))
                    continue
                name = f"megatron ({type(model.decoder.layers[0].mlp.experts).__name__})"
                attention = type(model.decoder.layers[0].self_attention.core_attention).__name__
                del hf
            with torch.no_grad():
                log_probs = fn(model, input_ids).float()
            reference = log_probs if reference is None else reference
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            ms = time_ms(loss_step(model, fn, input_ids), device, warmup, iters)
            tokens_per_s = tokens / ms * 1000.0
            tflops = shape.flop_per_token(layers) * tokens_per_s / 1e12
            rows.append(
                dict(
                    case=name,
                    attention=attention,
                    layers=layers,
                    ms=ms,
                    tokens_per_s=tokens_per_s,
                    tflops=tflops,
                    mfu=tflops / peak if peak else None,
                    max_abs_logprob_diff_vs_hf_eager=(log_probs - reference).abs().max().item(),
                    peak_gib=peak_gib(device),
                )
            )
            print(f"measured {name} ({layers} layers): {ms:.2f} ms", flush=True)  # in the log even if killed later
            model = hf = None  # free this case's model before the next one is built
    result["dense_tflops_measured"].append(dense_matmul_tflops(shape.dense_n, device, dtype, dense_warmup_s))


def summarise(result: dict) -> None:
    """x dense against the higher dense matmul rate, and one decoder layer's time for each case measured at both
    depths."""
    rows = result.get("rows", [])
    dense = max(result.get("dense_tflops_measured", []), default=None)
    result["dense_tflops"] = dense
    for row in rows:
        row["fraction_of_dense"] = row["tflops"] / dense if dense else None
    result["decoder_layer"] = []
    tokens = result["shape"]["batch"] * result["shape"]["seq"] if "shape" in result else 0
    for case in dict.fromkeys(row["case"] for row in rows):
        by_depth = {row["layers"]: row["ms"] for row in rows if row["case"] == case}
        if 1 in by_depth and 4 in by_depth:
            layer_ms = (by_depth[4] - by_depth[1]) / 3
            result["decoder_layer"].append(
                dict(case=case, decoder_layer_ms=layer_ms, tokens_per_s=tokens / layer_ms * 1000.0)
            )


def print_table(result: dict) -> None:
    if "shape" not in result:
        return  # stopped before anything was set up
    print(f"device: {result['device']}  dtype: {result['dtype']}  shape: {result['shape']}")
    dense = ", ".join(f"{tflops:.2f}" for tflops in result["dense_tflops_measured"])
    print(f"dense matmul measured: {dense} TFLOP/s (before, after the models); x dense divides by the higher")
    if result["peak_tflops"]:
        print(f"MFU against a dense bf16 peak of {result['peak_tflops']:.0f} TFLOP/s ({result['peak_tflops_from']})")
    else:
        print(f"MFU: peak FLOP/s of '{result['device']}' unknown (pass --peak-tflops)")
    header = f"{'case':36} {'attention':20} {'layers':>6} {'ms':>9} {'tokens/s':>11} {'TFLOP/s':>9} {'MFU':>6}"
    header += f" {'x dense':>8} {'|dlogp|':>9} {'GiB':>6}"
    print(header)
    print("-" * len(header))
    for row in result["rows"]:
        print(
            f"{row['case']:36} {row['attention']:20} {row['layers']:6d} {row['ms']:9.2f} {row['tokens_per_s']:11.0f} "
            f"{row['tflops']:9.3f} {fmt(row['mfu'], '.3f'):>6} {fmt(row['fraction_of_dense'], '.3f'):>8} "
            f"{row['max_abs_logprob_diff_vs_hf_eager']:9.2e} {fmt(row['peak_gib'], '.1f'):>6}"
        )
    print("one decoder layer = (t[4 layers] - t[1 layer]) / 3:")
    for row in result["decoder_layer"]:
        print(f"  {row['case']:34} {row['decoder_layer_ms']:9.2f} ms  {row['tokens_per_s']:11.0f} tokens/s")
    for note in result["notes"]:
        print("note:", note)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--small", action="store_true", help="tiny shape (hidden 64, 8 experts) to check on CPU")
    parser.add_argument(
        "--peak-tflops", type=float, help="MFU denominator (default: the device's dense bf16 peak, if known)"
    )
    parser.add_argument("--json", default="bench_moe_model.json", help="where to write the results")
    args = parser.parse_args(argv)
    require_device(args.device)
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        raise SystemExit(f"--peak-tflops must be > 0, got {args.peak_tflops}")
    return run_and_report(run, summarise, print_table, args)


if __name__ == "__main__":
    sys.exit(main())
