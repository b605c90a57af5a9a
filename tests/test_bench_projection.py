"""bench/project_30b.py: the on-paper Qwen3-30B-A3B projection, checked against numbers worked out by hand."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import project_30b  # noqa: E402  (a script in bench/, not a package module)
from bench_moe_model import FULL  # noqa: E402


def measured(layer_ms: float = 8.192, one_layer_ms: float = 16.384) -> dict:
    """A bench_moe_model.py result at full width: 4 x 2048 = 8192 tokens, so 8.192 ms is 1 us per token."""
    return {
        "shape": FULL.__dict__,
        "device": "test",
        "rows": [{"case": "megatron (GroupedExperts)", "layers": 1, "ms": one_layer_ms}],
        "decoder_layer": [
            {"case": "HF experts=grouped_mm", "decoder_layer_ms": 1.0},
            {"case": "megatron (GroupedExperts)", "decoder_layer_ms": layer_ms},
        ],
        "notes": [],
    }


def test_compute_only_projection_by_hand():
    p = project_30b.project(measured(), "megatron (GroupedExperts)", None, None, 989.0, recompute=False)
    # 48 layers x 1 us + (16.384 - 8.192) ms / 8192 tokens = 48 us + 1 us per token -> 1 / 49e-6 tokens/s
    assert p["seconds_per_token"] == pytest.approx({"decoder layers": 48e-6, "embedding, LM head, loss": 1e-6})
    assert p["train_tokens_per_s_per_gpu"] == pytest.approx(1 / 49e-6)
    # N_active = 48 x 56,885,248 (attention 10,485,760 + 8,388,608; router 262,144; experts 37,748,736)
    #            + 2048 x 151936 (LM head) = 3,041,656,832; FLOP/token = 6 N_active + 6 x 48 x 2048 x 4096
    assert p["flop_per_token"] == 6 * 3_041_656_832 + 6 * 48 * 2048 * 4096 == 20_665_860_096
    assert p["mfu_train"] == pytest.approx(20_665_860_096 / 49e-6 / 989e12)  # 0.4264
    assert p["logp_tokens_per_s_per_gpu"] == pytest.approx(3 / 49e-6)
    assert p["end_to_end_tokens_per_s_per_gpu"] is None


def test_all_to_all_and_generation_by_hand():
    p = project_30b.project(measured(), "megatron (GroupedExperts)", 100.0, 1000.0, 989.0, recompute=False)
    # per token and layer: 4 all-to-alls x 8 experts x 2048 x 2 bytes x 7/8 off the GPU = 114,688 bytes;
    # x 48 layers = 5,505,024 bytes at 100 GB/s = 55.05 us
    assert p["seconds_per_token"]["EP=8 all-to-all (assumed bandwidth)"] == pytest.approx(55.05024e-6)
    train = 1 / (49e-6 + 55.05024e-6)  # 9610.8 tokens/s
    assert p["train_tokens_per_s_per_gpu"] == pytest.approx(train)
    # generation, old log-probs (3x the training rate) and training in series: 878.2 tokens/s
    assert p["end_to_end_tokens_per_s_per_gpu"] == pytest.approx(1 / (1 / 1000 + 1 / (3 * train) + 1 / train))
    assert p["end_to_end_tokens_per_s_per_gpu"] == pytest.approx(878.2, abs=0.1)


def test_recompute_by_hand():
    # The preset's full recompute: every layer's forward (1/3 of its 1 us fwd+bwd) again, and 2 more all-to-alls.
    p = project_30b.project(measured(), "megatron (GroupedExperts)", 100.0, 1000.0, 989.0, recompute=True)
    # one all-to-all in each of 48 layers: 8 x 2048 x 2 bytes x 7/8 = 28,672 bytes x 48 at 100 GB/s = 13.76256 us
    assert p["seconds_per_token"] == pytest.approx(
        {
            "decoder layers": 48e-6,
            "embedding, LM head, loss": 1e-6,
            "EP=8 all-to-all (assumed bandwidth)": 4 * 13.76256e-6,
            "decoder layers' forward, recomputed": 16e-6,  # 48 x 1/3 us
            "recomputed forward's all-to-all": 2 * 13.76256e-6,
        }
    )
    train = 1 / (65e-6 + 6 * 13.76256e-6)  # 147.58 us per token: 6776.2 tokens/s, down from 9610.8 without recompute
    assert p["train_tokens_per_s_per_gpu"] == pytest.approx(train)
    assert p["train_tokens_per_s_per_gpu"] == pytest.approx(6776.2, abs=0.1)
    assert p["mfu_train"] == pytest.approx(20_665_860_096 * train / 989e12)  # 0.1416: recomputed FLOP not counted
    # the old-policy forward does not recompute: still 3x the no-recompute training rate
    assert p["logp_tokens_per_s_per_gpu"] == pytest.approx(3 / (49e-6 + 4 * 13.76256e-6))
    assert p["end_to_end_tokens_per_s_per_gpu"] == pytest.approx(845.8, abs=0.1)


def test_peak_from_the_device_name():
    assert project_30b.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert project_30b.peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert project_30b.peak_bf16_tflops("NVIDIA H200") == 989.0
    assert project_30b.peak_bf16_tflops("NVIDIA H100 NVL") is None
    assert project_30b.peak_bf16_tflops("cpu (x86_64, 2 cores, 1 threads)") is None


def test_default_case_is_the_megatron_row_and_bad_case_is_named():
    assert project_30b.megatron_case(measured(), None) == "megatron (GroupedExperts)"
    with pytest.raises(SystemExit, match="'nope' is not in the JSON"):
        project_30b.megatron_case(measured(), "nope")


def test_cli_refuses_a_small_run_and_writes_json(tmp_path, capsys):
    small = measured()
    small["shape"] = {**FULL.__dict__, "hidden": 64}
    (tmp_path / "small.json").write_text(json.dumps(small))
    with pytest.raises(SystemExit, match="'hidden': 64"):
        project_30b.main(["--model-json", str(tmp_path / "small.json")])
    with pytest.raises(SystemExit, match="missing.json: no such file"):
        project_30b.main(["--model-json", str(tmp_path / "missing.json")])
    (tmp_path / "layer.json").write_text(json.dumps({"rows": [], "goals": []}))  # bench_moe_layer's, by mistake
    with pytest.raises(SystemExit, match="not a bench_moe_model.py result"):
        project_30b.main(["--model-json", str(tmp_path / "layer.json")])
    (tmp_path / "full.json").write_text(json.dumps(measured()))
    out = tmp_path / "new" / "projection.json"  # its folder is created
    assert project_30b.main(["--model-json", str(tmp_path / "full.json"), "--json", str(out)]) == 0
    projection = json.loads(out.read_text())
    assert projection["train_tokens_per_s_per_gpu"] == pytest.approx(1 / 65e-6)  # recompute by default: 48 x 4/3 + 1 us
    assert projection["mfu_train"] is None  # device "test": no known peak, and none passed
    printed = capsys.readouterr().out
    assert "compute only" in printed and "MFU: peak unknown" in printed and "sequences of 2048" in printed
    assert "not included: the actor's offload/reload" in printed
    flags = ["--no-recompute", "--peak-tflops", "989"]
    assert project_30b.main(["--model-json", str(tmp_path / "full.json"), *flags]) == 0
    # 1 / 49 us without recompute; MFU 20,665,860,096 x 20408 / 989e12
    assert "20408 tokens/s/GPU without recompute, MFU 0.426 of 989 TFLOP/s" in capsys.readouterr().out
