"""Per-token log-probs from megatron's vocab-parallel logits at a sampling temperature, in one process on CPU.

The rollout temperature (`--rollout.temperature`) scales the logits before the softmax in vLLM's sampling and in
OpenRLHF's log-probs; the importance ratio is only right if ours do the same. The 2-process suite compares log-probs
at temperature 1 in every layout (test_megatron_distributed.py); this checks the division.
"""

import helpers_megatron as hm
import pytest
import torch

pytest.importorskip("megatron.core")


@pytest.fixture
def megatron_and_hf(cpu_shims):
    from openrlhf_gmpo.megatron.model import build_gpt_model
    from openrlhf_gmpo.megatron.parallel import ParallelSizes
    from openrlhf_gmpo.megatron.weights import load_hf_weights

    hf = hm.tiny_hf_moe()
    with hm.one_process_world():
        model = build_gpt_model(hf.config, ParallelSizes(1))
        load_hf_weights(model, hf.state_dict(), hf.config)
        model.eval()
        yield model, hf


@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.3])
def test_log_probs_at_a_temperature_equal_hf_with_scaled_logits(megatron_and_hf, temperature):
    from openrlhf_gmpo.megatron.logprobs import token_log_probs

    model, hf = megatron_and_hf
    batch = hm.policy_batch()
    ids, mask = batch["sequences"], batch["attention_mask"]
    with torch.no_grad():
        ours = token_log_probs(model, ids, mask, temperature=temperature)
    reference = hm.hf_token_log_probs(hf, ids, mask, temperature=temperature)
    valid = hm.valid_prediction_mask(mask)
    torch.testing.assert_close(ours[valid], reference[valid], atol=1e-4, rtol=0)
    if temperature != 1.0:  # the temperature matters at this size: the unscaled log-probs are far off
        unscaled = hm.hf_token_log_probs(hf, ids, mask)
        assert (unscaled[valid] - reference[valid]).abs().max() > 0.05


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_a_temperature_that_is_not_positive_is_refused(megatron_and_hf, temperature):
    from openrlhf_gmpo.megatron.logprobs import token_log_probs

    model, _ = megatron_and_hf
    batch = hm.policy_batch()
    with pytest.raises(ValueError, match=f"temperature={temperature} must be > 0"):
        token_log_probs(model, batch["sequences"], batch["attention_mask"], temperature=temperature)
