"""On paper: Qwen3-30B-A3B GMPO training tokens/s/GPU at EP=8 on 8 H100s, from a measured `bench_moe_model.py` run.

    python bench/project_30b.py --model-json bench_moe_model.json [--a2a-gbps 300] [--gen-tokens-per-s 3000]
                                [--no-recompute]

Inputs, and what each one assumes (bench/README.md gives the formula):
- measured: one decoder layer's fwd+bwd time and the 1-layer model's time (embedding, LM head, loss) of the megatron
  backend on one GPU at EP=1, 4 x 2048 tokens. At EP=8 each GPU keeps 16 of the 128 experts and, with even routing,
  runs the same number of token-expert pairs per token through them, in fewer, larger GEMMs; so the EP=1 time per
  token is a slightly pessimistic stand-in for the EP=8 compute.
- `--recompute` (default on, as the 8-GPU preset's `megatron.recompute: true`): full activation recompute runs every
  decoder layer's forward again in the backward, so a layer costs 1 + 1/3 of its measured fwd+bwd time (the forward
  is ~1/3 of the FLOP), and its dispatch and combine all-to-alls run again: 6 per layer instead of 4. MFU still
  counts the model's FLOP only, not the recomputed ones.
- `--a2a-gbps` (optional, an assumption, not a measurement): the all-to-all bandwidth per GPU. Per token and layer,
  fwd+bwd does 4 all-to-alls (dispatch, combine, and their gradients; 6 with recompute) of top_k x hidden bf16 values,
  of which (EP-1)/EP leave the GPU; no overlap with compute is assumed. Left out, the projection is compute-only.
- `--gen-tokens-per-s` (optional, an assumption): vLLM rollout tokens/s/GPU on the same GPUs; with it the script adds
  an end-to-end figure. GMPO has no KL term: one old-policy log-prob pass (forward only, ~1/3 of the training FLOP)
  and no reference model.
Not included, though the preset pays them every RL step: the actor's offload to CPU and reload around generation
(`ds.enable_sleep`) and the weight sync to vLLM. The measured times hold at the bench's sequence length (printed); the
preset trains sequences of up to 4096 tokens, where attention costs more per token.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench_moe_model import FULL, ModelShape, peak_bf16_tflops

QWEN3_30B_A3B_LAYERS = 48
EXPERT_PARALLEL = 8
BF16_BYTES = 2
ALL_TO_ALLS_PER_LAYER = 4  # dispatch + combine, forward and backward
RECOMPUTE_SHARE = 1 / 3  # the forward's share of a layer's fwd+bwd time, run again under full recompute
RECOMPUTE_ALL_TO_ALLS = 2  # the recomputed forward's dispatch + combine
MODEL_WIDTH = ("vocab", "hidden", "heads", "kv_heads", "head_dim", "expert_ffn", "experts", "top_k")


def megatron_case(result: dict, case: str | None) -> str:
    """The measured case to project from: `case`, else the megatron backend's row (GroupedExperts where it ran)."""
    cases = [row["case"] for row in result["decoder_layer"]]
    if case is not None:
        if case not in cases:
            raise SystemExit(f"--case {case!r} is not in the JSON; it has {cases}")
        return case
    megatron = [name for name in cases if name.startswith("megatron")]
    if not megatron:
        raise SystemExit(f"no megatron row in the JSON (cases {cases}); its notes: {result.get('notes')}")
    return megatron[0]


def project(
    result: dict,
    case: str,
    a2a_gbps: float | None,
    gen_tokens_per_s: float | None,
    peak_tflops: float | None,
    recompute: bool,
):
    shape = result["shape"]
    tokens = shape["batch"] * shape["seq"]
    layer_ms = next(row["decoder_layer_ms"] for row in result["decoder_layer"] if row["case"] == case)
    one_layer = next(row for row in result["rows"] if row["case"] == case and row["layers"] == 1)
    layers_s = QWEN3_30B_A3B_LAYERS * layer_ms / 1000 / tokens
    seconds_per_token = {
        "decoder layers": layers_s,
        "embedding, LM head, loss": (one_layer["ms"] - layer_ms) / 1000 / tokens,
    }
    a2a_s = 0.0  # per token: one all-to-all in each of the 48 layers
    if a2a_gbps is not None:
        bytes_out = shape["top_k"] * shape["hidden"] * BF16_BYTES * (EXPERT_PARALLEL - 1) / EXPERT_PARALLEL
        a2a_s = QWEN3_30B_A3B_LAYERS * bytes_out / (a2a_gbps * 1e9)
        seconds_per_token["EP=8 all-to-all (assumed bandwidth)"] = ALL_TO_ALLS_PER_LAYER * a2a_s
    # The old-policy log-probs: forward only, ~1/3 of the fwd+bwd without recompute (which the forward never needs).
    logp_rate = 3 / sum(seconds_per_token.values())
    if recompute:
        seconds_per_token["decoder layers' forward, recomputed"] = RECOMPUTE_SHARE * layers_s
        if a2a_gbps is not None:
            seconds_per_token["recomputed forward's all-to-all"] = RECOMPUTE_ALL_TO_ALLS * a2a_s
    train_rate = 1.0 / sum(seconds_per_token.values())
    flop = ModelShape(**shape).flop_per_token(QWEN3_30B_A3B_LAYERS)  # the bench's own FLOP count
    projection = dict(
        case=case,
        attention=one_layer.get("attention", "not recorded"),
        measured_on=result["device"],
        sequence_length=shape["seq"],
        recompute=recompute,
        decoder_layer_ms=layer_ms,
        one_layer_model_ms=one_layer["ms"],
        tokens_per_measurement=tokens,
        seconds_per_token=seconds_per_token,
        flop_per_token=flop,
        train_tokens_per_s_per_gpu=train_rate,
        peak_tflops=peak_tflops,
        mfu_train=train_rate * flop / (peak_tflops * 1e12) if peak_tflops else None,
        logp_tokens_per_s_per_gpu=logp_rate,
        a2a_gbps_assumed=a2a_gbps,
        gen_tokens_per_s_assumed=gen_tokens_per_s,
        end_to_end_tokens_per_s_per_gpu=None,
    )
    if gen_tokens_per_s is not None:
        projection["end_to_end_tokens_per_s_per_gpu"] = 1.0 / (
            1.0 / gen_tokens_per_s + 1.0 / logp_rate + 1.0 / train_rate
        )
    return projection


def check_shape(result: dict, allow_small: bool) -> None:
    measured = {key: result["shape"][key] for key in MODEL_WIDTH}
    full = {key: FULL.__dict__[key] for key in MODEL_WIDTH}
    if measured != full and not allow_small:
        raise SystemExit(
            f"the JSON was measured at {measured}, not Qwen3-30B-A3B's width {full}: "
            "run bench_moe_model.py without --small (or pass --allow-small to check this script)"
        )


def print_projection(p: dict) -> None:
    print(f"from {p['case']} (attention: {p['attention']}) on {p['measured_on']}: decoder layer "
          f"{p['decoder_layer_ms']:.2f} ms, 1-layer model {p['one_layer_model_ms']:.2f} ms per "
          f"{p['tokens_per_measurement']} tokens")  # fmt: skip
    for part, seconds in p["seconds_per_token"].items():
        print(f"  {part:38} {seconds * 1e6:10.2f} us/token")
    mfu = "MFU: peak unknown (--peak-tflops)"
    if p["mfu_train"] is not None:
        mfu = f"MFU {p['mfu_train']:.3f} of {p['peak_tflops']:.0f} TFLOP/s"
    recompute = "with full recompute" if p["recompute"] else "without recompute"
    print(f"training       {p['train_tokens_per_s_per_gpu']:10.0f} tokens/s/GPU {recompute}, {mfu}")
    print(f"old log-probs  {p['logp_tokens_per_s_per_gpu']:10.0f} tokens/s/GPU (forward only, 1/3 of the FLOP)")
    if p["end_to_end_tokens_per_s_per_gpu"] is not None:
        print(f"end to end     {p['end_to_end_tokens_per_s_per_gpu']:10.0f} tokens/s/GPU "
              f"with generation at {p['gen_tokens_per_s_assumed']:.0f} (assumed)")  # fmt: skip
    if p["a2a_gbps_assumed"] is None:
        print("compute only: no all-to-all time (pass --a2a-gbps to add one)")
    print(f"measured at sequences of {p['sequence_length']} tokens; the 8-GPU preset trains up to 4096, where "
          "attention costs more per token")  # fmt: skip
    print("not included: the actor's offload/reload around generation (ds.enable_sleep) and the weight sync to vLLM")
    print("published, for comparison only: NeMo-RL 925 tokens/s/GPU end to end (32 H100s); verl MFU 0.40 (training)")


def positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-json", required=True, help="bench_moe_model.py's JSON")
    parser.add_argument("--case", help="the row to project from (default: the megatron backend's)")
    parser.add_argument("--a2a-gbps", type=positive, help="assumed all-to-all GB/s per GPU")
    parser.add_argument("--gen-tokens-per-s", type=positive, help="assumed vLLM rollout tokens/s/GPU")
    parser.add_argument(
        "--peak-tflops", type=positive, help="MFU denominator (default: the measuring GPU's dense bf16 peak, if known)"
    )
    parser.add_argument(
        "--recompute",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="full activation recompute, as the 8-GPU preset (megatron.recompute: true)",
    )
    parser.add_argument("--allow-small", action="store_true", help="accept a --small run (checks the script only)")
    parser.add_argument("--json", help="also write the projection here")
    args = parser.parse_args(argv)
    path = Path(args.model_json)
    if not path.is_file():
        raise SystemExit(f"--model-json {args.model_json}: no such file")
    result = json.loads(path.read_text())
    missing = {"shape", "rows", "decoder_layer"} - set(result)
    if missing:
        raise SystemExit(f"--model-json {path}: not a bench_moe_model.py result (no {', '.join(sorted(missing))})")
    check_shape(result, args.allow_small)
    peak = args.peak_tflops or peak_bf16_tflops(result["device"])
    case = megatron_case(result, args.case)
    projection = project(result, case, args.a2a_gbps, args.gen_tokens_per_s, peak, args.recompute)
    print_projection(projection)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(projection, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
