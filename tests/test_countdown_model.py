import pytest
import torch

from openrlhf_gmpo.countdown.model import (
    build_model,
    count_parameters,
    model_config,
    save_checkpoint,
    to_low_precision,
)
from openrlhf_gmpo.countdown.tokenizer import build_tokenizer

VOCAB = 40  # len(build_tokenizer())


def test_200m_config_parameter_count_and_routing():
    config = model_config("200m", 64)
    # Per layer: attention q,o 512*512 each + k,v 512*256 each = 786,432; q/k norms 2*64 = 128; two RMSNorms 2*512;
    # router 8*512 = 4,096; experts 8 * 3 * 512 * 1536 = 18,874,368 -> 19,666,048 per layer, 196,660,480 for 10;
    # plus the tied embedding 64*512 = 32,768 and the final norm 512 -> 196,693,760.
    assert count_parameters(config) == 196_693_760
    assert count_parameters(model_config("200m", VOCAB)) == 196_693_760 - 24 * 512  # 24 fewer embedding rows
    assert (config.num_experts, config.num_experts_per_tok) == (8, 1)
    assert config.norm_topk_prob is False and config.output_router_logits is False
    assert config.tie_word_embeddings is True and config.head_dim == 64


def test_tiny_model_builds_runs_and_is_seeded():
    model = build_model("tiny", VOCAB, seed=3)
    # Per layer: attention 128*128*2 + 128*64*2 = 49,152; q/k norms 64; RMSNorms 256; router 1,024;
    # experts 8 * 3 * 128 * 192 = 589,824 -> 640,320; 4 layers 2,561,280 + embedding 5,120 + final norm 128.
    assert sum(p.numel() for p in model.parameters()) == 2_566_528
    same = build_model("tiny", VOCAB, seed=3)
    other = build_model("tiny", VOCAB, seed=4)
    weight = "model.layers.0.mlp.experts.gate_up_proj"
    assert torch.equal(model.state_dict()[weight], same.state_dict()[weight])
    assert not torch.equal(model.state_dict()[weight], other.state_dict()[weight])
    assert model.state_dict()[weight].std() > 0  # initialised, not left at zero

    input_ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    output = model(input_ids=input_ids)
    assert output.logits.shape == (2, 12, VOCAB)
    assert torch.isfinite(output.logits).all()
    assert output.aux_loss is None  # router logits are off by default


def test_low_precision_keeps_rope_frequencies_in_fp32():
    model = build_model("tiny", VOCAB, seed=0)
    frequencies = model.model.rotary_emb.inv_freq.clone()
    model = to_low_precision(model, torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    rotary = model.model.rotary_emb
    assert rotary.inv_freq.dtype == rotary.original_inv_freq.dtype == torch.float32
    assert torch.equal(rotary.inv_freq, frequencies)
    # A plain cast would round them: 1/10000^(2i/d) is not a bf16 number for most i.
    assert not torch.equal(frequencies.bfloat16().float(), frequencies)
    logits = model(input_ids=torch.arange(12)[None] % VOCAB).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_unknown_size_is_refused():
    with pytest.raises(ValueError, match="unknown model size '7b'"):
        model_config("7b", VOCAB)


def test_checkpoint_reloads_as_qwen3_moe_in_bf16(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = build_tokenizer()
    model = build_model("tiny", len(tokenizer), seed=0, pad_token_id=tokenizer.pad_token_id)
    expected = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    save_checkpoint(model, tokenizer, str(tmp_path))
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is not converted
    assert (tmp_path / "model.safetensors").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(reloaded).__name__ == "Qwen3MoeForCausalLM"
    assert reloaded.config.dtype == torch.bfloat16
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor.to(torch.bfloat16), expected[name]), name
    assert len(AutoTokenizer.from_pretrained(tmp_path)) == len(tokenizer)
