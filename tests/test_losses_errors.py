"""Bad input raises ValueError whose message names the offending argument."""

import pytest
import torch

from openrlhf_gmpo.losses import compute_policy_loss


def good():
    return dict(
        log_probs=torch.zeros(2, 3),
        old_log_probs=torch.zeros(2, 3),
        advantages=torch.tensor([1.0, -1.0]),
        action_mask=torch.ones(2, 3, dtype=torch.bool),
        clip_eps_low=0.2,
        clip_eps_high=0.2,
    )


def call(name="gmpo", **overrides):
    kwargs = good() | overrides
    positional = [kwargs.pop(k) for k in ("log_probs", "old_log_probs", "advantages", "action_mask")]
    return compute_policy_loss(name, *positional, **kwargs)


NAN_AT_VALID = torch.tensor([[0.0, float("nan"), 0.0], [0.0, 0.0, 0.0]])


@pytest.mark.parametrize(
    "overrides,pattern",
    [
        ({"log_probs": torch.zeros(2, 4)}, "log_probs must be|old_log_probs has shape"),
        ({"log_probs": torch.zeros(6)}, "log_probs must be a non-empty"),
        ({"log_probs": torch.zeros(0, 3)}, "log_probs must be a non-empty"),
        ({"old_log_probs": torch.zeros(3, 3)}, "old_log_probs has shape"),
        ({"action_mask": torch.ones(2, 2)}, "action_mask has shape"),
        ({"advantages": torch.zeros(3)}, "advantages has shape"),
        ({"advantages": torch.zeros(2, 2)}, "advantages has shape"),
        ({"rollout_log_probs": torch.zeros(2, 2)}, "rollout_log_probs has shape"),
        ({"log_probs": [[0.0]]}, "log_probs must be a torch.Tensor"),
        ({"clip_eps_low": 0.0}, "clip_eps_low"),
        ({"clip_eps_high": -0.1}, "clip_eps_high"),
        ({"clip_eps_high": float("nan")}, "clip_eps_high"),
        ({"clip_eps_low": True}, "clip_eps_low must be a finite number > 0, got True"),  # not 1.0
        ({"rollout_is_cap": 0}, "rollout_is_cap"),
        ({"dp_size": 0}, "dp_size"),
        ({"dp_size": 2.0}, "dp_size"),
        ({"global_batch_size": 0}, "global_batch_size"),
        ({"global_batch_size": torch.tensor(-1.0)}, "global_batch_size"),
        ({"global_batch_size": torch.tensor(float("nan"))}, "global_batch_size"),
        ({"global_batch_size": torch.ones(2)}, "global_batch_size"),
        ({"global_batch_size": torch.ones(0)}, "global_batch_size must be a number or a 1-element tensor"),
        ({"action_mask": torch.tensor([[1, 2, 0], [1, 1, 1]])}, "action_mask must hold only 0/1"),
        ({"action_mask": torch.tensor([[1.0, 0.5, 0.0], [1.0, 1.0, 1.0]])}, "action_mask must hold only 0/1"),
        ({"action_mask": torch.tensor([[1, -1, 0], [1, 1, 1]])}, "action_mask must hold only 0/1"),
        ({"log_probs": NAN_AT_VALID}, "log_probs has NaN/inf"),
        ({"old_log_probs": -NAN_AT_VALID.exp() * float("inf")}, "old_log_probs has NaN/inf"),
        ({"rollout_log_probs": NAN_AT_VALID}, "rollout_log_probs has NaN/inf"),
        ({"advantages": torch.tensor([float("inf"), 1.0])}, "advantages has NaN/inf"),
        ({"advantages": torch.tensor([[1.0, 1.0, 1.0], [1.0, 2.0, 1.0]])}, "advantages must be constant"),
        ({"advantages": torch.tensor([[1.0, float("nan"), 1.0], [1.0, 1.0, 1.0]])}, "advantages has NaN/inf"),
    ],
)
def test_bad_input_names_the_argument(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        call(**overrides)


@pytest.mark.parametrize(
    "overrides, where",
    [
        ({"action_mask": torch.tensor([[1, 1, 1], [1, 2, 0]])}, "first at [1, 1]: 2"),
        ({"action_mask": torch.tensor([[1, 2, 0], [1, 3, 1]])}, "first at [0, 1]: 2"),  # the first of two
        ({"log_probs": NAN_AT_VALID}, "first at [0, 1]: nan"),
        ({"advantages": torch.tensor([1.0, float("inf")])}, "first at [1]: inf"),
        ({"advantages": torch.tensor([[1.0, 1.0, 1.0], [1.0, 2.0, 1.0]])}, "first in row 1: from 1.0 to 2.0"),
    ],
)
def test_bad_input_error_says_where_and_what(overrides, where):
    # The message names the first offending entry and its value, so a bad batch can be found in a long run's logs.
    with pytest.raises(ValueError) as error:
        call(**overrides)
    assert str(error.value).endswith(f"({where})")


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown policy loss 'ppo'"):
        call("ppo")


def test_masked_garbage_is_not_an_error():
    mask = torch.tensor([[1, 0, 1], [1, 1, 1]])
    loss, _ = call(log_probs=NAN_AT_VALID, action_mask=mask)  # the NaN sits at a masked position
    assert torch.isfinite(loss)


def test_huge_finite_values_are_not_reported_as_nan():
    # finite inputs whose difference (4.5e38) overflows fp32 to inf: the fast check's masked sum is inf, so
    # validation looks entry by entry, finds every input finite and raises nothing; the +-20 clamp keeps the loss finite
    log_probs = torch.full((2, 3), 3e38)
    loss, _ = call(log_probs=log_probs, old_log_probs=-log_probs / 2)
    assert torch.isfinite(loss)
