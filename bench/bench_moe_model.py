"""Qwen3-30B-A3B-width models (random weights) of 1 and 4 layers, fwd+bwd: HF vs the megatron backend, tokens/s and MFU.

    python bench/bench_moe_model.py                          # one H100: 4 x 2048 tokens, vocab 151936
    python bench/bench_moe_model.py --device cpu --small     # seconds on CPU: checks that every case runs

One decoder layer's time is measured as (t[4 layers] - t[1 layer]) / 3, which removes the embedding, LM head and loss.
The megatron side is `openrlhf_gmpo.megatron.model.build_gpt_model` (GroupedExperts on CUDA without Transformer Engine,
SequentialMLP on CPU), loaded with the HF model's weights through `openrlhf_gmpo.megatron.weights`; the table shows the
largest per-token log-prob difference from HF eager as a check. If that backend is not importable, HF runs alone.

FLOP per token (fwd+bwd, matmuls only; causal attention scores/values averaged over the sequence):
    6 * N_active + 6 * L * S * (heads * head_dim)
    N_active = L * (H*(heads + 2*kv_heads)*head_dim + heads*head_dim*H + H*E + top_k*3*H*F) + H*V
MFU = FLOP/token x tokens/s / --peak-tflops (default 989: H100 SXM dense bf16); "x dense" divides by the dense bf16
matmul rate measured in the same run instead.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from dataclasses import dataclass

import torch
from bench_moe_layer import dense_matmul_ms, device_name, init_megatron, require_device, run_and_report, time_ms

H100_DENSE_BF16_TFLOPS = 989.0


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


def hf_model(shape: ModelShape, layers: int, implementation: str, device: str, dtype: torch.dtype):
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(0)  # the same random weights for every implementation of a given depth
    with torch.device(device):  # random init of ~3B parameters where they will run, not on the host first
        model = Qwen3MoeForCausalLM(shape.hf_config(layers, implementation))
    with torch.no_grad():  # HF leaves the router at zero: every token would tie; give it a random one
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(0.0, shape.hidden**-0.5)
    return model.to(device, dtype).train()


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


def run(args) -> dict:
    shape = SMALL if args.small else FULL
    device, dtype = args.device, torch.bfloat16
    warmup, iters = (1, 2) if args.small else (2, 5)
    init_megatron(device)
    dense_tflops = 2 * shape.dense_n**3 / dense_matmul_ms(shape.dense_n, device, dtype, warmup, iters) / 1e9
    input_ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=torch.Generator().manual_seed(1))
    input_ids = input_ids.to(device)
    tokens = shape.batch * shape.seq
    notes, rows = [], []
    megatron_ok = True
    for layers in (1, 4):
        reference = None
        for implementation in ("eager", "grouped_mm", "megatron"):
            hf = hf_model(shape, layers, "eager" if implementation == "megatron" else implementation, device, dtype)
            model, fn, name = hf, hf_log_probs, f"HF experts={implementation}"
            if implementation == "megatron":
                if not megatron_ok:
                    continue
                try:
                    model, fn, name = megatron_model(hf, shape, layers, device, dtype), megatron_log_probs, "megatron"
                except Exception:  # report and keep the HF numbers: the backend is another engineer's moving part
                    megatron_ok = False
                    notes.append("megatron backend unavailable, HF only:\n" + traceback.format_exc(limit=3))
                    continue
                experts = model.decoder.layers[0].mlp.experts
                name = f"megatron ({type(experts).__name__})"
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
                    layers=layers,
                    ms=ms,
                    tokens_per_s=tokens_per_s,
                    tflops=tflops,
                    mfu=tflops / args.peak_tflops,
                    fraction_of_dense=tflops / dense_tflops,
                    max_abs_logprob_diff_vs_hf_eager=(log_probs - reference).abs().max().item(),
                    peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
                )
            )
            del model
    per_layer = []
    for case in dict.fromkeys(row["case"] for row in rows):
        by_depth = {row["layers"]: row["ms"] for row in rows if row["case"] == case}
        if 1 in by_depth and 4 in by_depth:
            layer_ms = (by_depth[4] - by_depth[1]) / 3
            per_layer.append(dict(case=case, decoder_layer_ms=layer_ms, tokens_per_s=tokens / layer_ms * 1000.0))
    return dict(
        shape=shape.__dict__,
        device=device_name(device),
        dtype=str(dtype),
        dense_tflops=dense_tflops,
        peak_tflops=args.peak_tflops,
        rows=rows,
        decoder_layer=per_layer,
        notes=notes,
    )


def print_table(result: dict) -> None:
    print(f"device: {result['device']}  dtype: {result['dtype']}  shape: {result['shape']}")
    print(f"dense matmul measured: {result['dense_tflops']:.2f} TFLOP/s; MFU against {result['peak_tflops']} TFLOP/s")
    header = f"{'case':36} {'layers':>6} {'ms':>9} {'tokens/s':>11} {'TFLOP/s':>9} {'MFU':>6} {'x dense':>8}"
    header += f" {'|dlogp|':>9} {'GiB':>6}"
    print(header)
    print("-" * len(header))
    for row in result["rows"]:
        gib = f"{row['peak_gib']:.1f}" if row["peak_gib"] is not None else "-"
        print(
            f"{row['case']:36} {row['layers']:6d} {row['ms']:9.2f} {row['tokens_per_s']:11.0f} {row['tflops']:9.3f} "
            f"{row['mfu']:6.3f} {row['fraction_of_dense']:8.3f} {row['max_abs_logprob_diff_vs_hf_eager']:9.2e} {gib:>6}"
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
    parser.add_argument("--peak-tflops", type=float, default=H100_DENSE_BF16_TFLOPS, help="MFU denominator")
    parser.add_argument("--json", default="bench_moe_model.json", help="where to write the results")
    args = parser.parse_args(argv)
    require_device(args.device)
    if args.peak_tflops <= 0:
        raise SystemExit(f"--peak-tflops must be > 0, got {args.peak_tflops}")
    return run_and_report(run, print_table, args)


if __name__ == "__main__":
    sys.exit(main())
