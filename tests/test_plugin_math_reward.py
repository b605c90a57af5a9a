"""The math answer reward file the dense and Qwen3-MoE presets pass as --reward.remote_url."""

import importlib.util
import os

import helpers_plugin
import pytest
import torch

PATH = os.path.join(helpers_plugin.ROOT, "openrlhf_gmpo", "openrlhf_plugin", "math_reward.py")


@pytest.fixture(scope="module")
def reward():
    # Loaded by file path, as OpenRLHF's SingleTurnAgentExecutor loads it inside the rollout workers.
    spec = importlib.util.spec_from_file_location("reward_func", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("response", "label", "expected"),
    [
        ("so x = 1/2, \\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}", 1.0),  # \dfrac and \frac are the same answer
        ("\\boxed{x^{2} + 1}.", "x^{2}+1", 1.0),  # nested braces; spaces ignored
        ("\\boxed{3} then \\boxed{4}", "4", 1.0),  # the last box counts
        ("\\boxed{90^{\\circ}}", "90", 1.0),  # degree sign dropped
        ("\\boxed{90^{\\circ}}", "90^\\circ", 1.0),  # in every spelling, on both sides
        ("\\boxed{90°}", "90^\\circ", 1.0),
        ("\\boxed{5\\text{ cm}}", "5", 1.0),  # a unit after the value is ignored
        ("\\boxed{5\\text{ cm}}", "6", 0.0),
        ("\\boxed{\\text{odd}}", "odd", 1.0),  # a \text{} answer with nothing before it is the answer
        ("\\boxed{\\text{(B)}}", "(B)", 1.0),  # \text{} unwrapped
        ("\\boxed{5}", "The sum is $\\boxed{5}$.", 1.0),  # a worked-solution label is reduced to its box
        ("\\boxed{0.5}", "\\frac{1}{2}", 0.0),  # textual, not symbolic: equivalent forms do not match
        ("the answer is 4", "4", 0.0),  # no box
        ("\\boxed{12", "12", 0.0),  # cut off inside the box
        ("\\boxed{13}", "12", 0.0),
    ],
)
def test_score(reward, response, label, expected):
    assert reward.score(response, label) == expected


def test_reward_func_scores_the_response_not_the_prompt(reward):
    # The Qwen-Math prompt itself contains "\boxed{}": only the part after the prompt is scored.
    prompt = "Please put your final answer within \\boxed{}. What is 2+2?"
    queries = [prompt + " It is \\boxed{4}", prompt + " It is 4"]
    out = reward.reward_func(queries, [prompt, prompt], ["4", "4"])
    torch.testing.assert_close(out["rewards"], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(out["scores"], out["rewards"])
    torch.testing.assert_close(out["extra_logs"]["math_correct"], torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="differ in length: 2, 1, 2"):
        reward.reward_func(queries, [prompt], ["4", "4"])
