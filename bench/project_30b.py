"""On paper: Qwen3-30B-A3B GMPO training tokens/s/GPU at EP=8 on 8 H100s, from a measured `bench_moe_model.py` run.

    python bench/project_30b.py --model-json bench_moe_model.json [--a2a-gbps 300] [--gen-tokens-per-s 3000]

Inputs, and what each one assumes (bench/README.md gives the formula):
- measured: one decoder layer's fwd+bwd time and the 1-layer model's time (embedding, LM head, loss) of the megatron
  backend on one GPU at EP=1, 4 x 2048 tokens. At EP=8 each GPU keeps 16 of the 128 experts and, with even routing,
  runs the same number of token-expert pairs per token through them, in fewer, larger GEMMs; so the EP=1 time per
  token is a slightly pessimistic stand-in for the EP=8 compute.
- `--a2a-gbps` (optional, an assumption, not a measurement): the all-to-all bandwidth per GPU. Per token and layer,
  fwd+bwd does 4 all-to-alls (dispatch, combine, and their gradients) of top_k x hidden bf16 values, of which
  (EP-1)/EP leave the GPU; no overlap with compute is assumed. Left out, the projection is compute-only.
- `--gen-tokens-per-s` (optional, an assumption): vLLM rollout tokens/s/GPU on the same GPUs; with it the script adds
  an end-to-end figure. GMPO has no KL term: one old-policy log-prob pass (forward only, ~1/3 of the training FLOP)
  and no reference model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench_moe_model import FULL, ModelShape

QWEN3_30B_A3B_LAYERS = 48
EXPERT_PARALLEL = 8
BF16_BYTES = 2
ALL_TO_ALLS_PER_LAYER = 4  # dispatch + combine, forward and backward
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


def project(result: dict, case: str, a2a_gbps: float | None, gen_tokens_per_s: float | None, peak_tflops: float):
    shape = result["shape"]
    tokens = shape["batch"] * shape["seq"]
    layer_ms = next(row["decoder_layer_ms"] for row in result["decoder_layer"] if row["case"] == case)
    one_layer_ms = next(row["ms"] for row in result["rows"] if row["case"] == case and row["layers"] == 1)
    seconds_per_token = {
        "decoder layers": QWEN3_30B_A3B_LAYERS * layer_ms / 1000 / tokens,
        "embedding, LM head, loss": (one_layer_ms - layer_ms) / 1000 / tokens,
    }
    if a2a_gbps is not None:
        bytes_out = shape["top_k"] * shape["hidden"] * BF16_BYTES * (EXPERT_PARALLEL - 1) / EXPERT_PARALLEL
        a2a_bytes = ALL_TO_ALLS_PER_LAYER * QWEN3_30B_A3B_LAYERS * bytes_out
        seconds_per_token["EP=8 all-to-all (assumed bandwidth)"] = a2a_bytes / (a2a_gbps * 1e9)
    train_rate = 1.0 / sum(seconds_per_token.values())
    flop = ModelShape(**shape).flop_per_token(QWEN3_30B_A3B_LAYERS)  # the bench's own FLOP count
    projection = dict(
        case=case,
        measured_on=result["device"],
        decoder_layer_ms=layer_ms,
        one_layer_model_ms=one_layer_ms,
        tokens_per_measurement=tokens,
        seconds_per_token=seconds_per_token,
        flop_per_token=flop,
        train_tokens_per_s_per_gpu=train_rate,
        mfu_train=train_rate * flop / (peak_tflops * 1e12),
        logp_tokens_per_s_per_gpu=3 * train_rate,
        a2a_gbps_assumed=a2a_gbps,
        gen_tokens_per_s_assumed=gen_tokens_per_s,
        end_to_end_tokens_per_s_per_gpu=None,
    )
    if gen_tokens_per_s is not None:
        projection["end_to_end_tokens_per_s_per_gpu"] = 1.0 / (
            1.0 / gen_tokens_per_s + 1.0 / projection["logp_tokens_per_s_per_gpu"] + 1.0 / train_rate
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
    print(f"from {p['case']} on {p['measured_on']}: decoder layer {p['decoder_layer_ms']:.2f} ms, "
          f"1-layer model {p['one_layer_model_ms']:.2f} ms per {p['tokens_per_measurement']} tokens")  # fmt: skip
    for part, seconds in p["seconds_per_token"].items():
        print(f"  {part:38} {seconds * 1e6:10.2f} us/token")
    print(f"training       {p['train_tokens_per_s_per_gpu']:10.0f} tokens/s/GPU, MFU {p['mfu_train']:.3f}")
    print(f"old log-probs  {p['logp_tokens_per_s_per_gpu']:10.0f} tokens/s/GPU (forward only, 1/3 of the FLOP)")
    if p["end_to_end_tokens_per_s_per_gpu"] is not None:
        print(f"end to end     {p['end_to_end_tokens_per_s_per_gpu']:10.0f} tokens/s/GPU "
              f"with generation at {p['gen_tokens_per_s_assumed']:.0f} (assumed)")  # fmt: skip
    if p["a2a_gbps_assumed"] is None:
        print("compute only: no all-to-all time (pass --a2a-gbps to add one)")
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
    parser.add_argument("--peak-tflops", type=positive, default=989.0, help="MFU denominator (H100 SXM bf16)")
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
    projection = project(
        result, megatron_case(result, args.case), args.a2a_gbps, args.gen_tokens_per_s, args.peak_tflops
    )
    print_projection(projection)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(projection, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
