"""The reward file as OpenRLHF 0.11.2 uses it: loaded by path by the real SingleTurnAgentExecutor, called from its
execute() with the query it decodes itself, and the result fed to the real experience builder."""

import asyncio
import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import openrlhf_gmpo.countdown as countdown_package
from openrlhf_gmpo.countdown.prompts import prompt_text, sft_response
from openrlhf_gmpo.countdown.tasks import CountdownTask
from openrlhf_gmpo.countdown.tokenizer import build_tokenizer

REWARD_FILE = str(Path(countdown_package.__file__).with_name("reward_func.py"))
TASK = CountdownTask((44, 19, 35), 28)
LABEL = json.dumps({"numbers": list(TASK.numbers), "target": TASK.target})


def load_by_path(name="reward_func"):
    spec = importlib.util.spec_from_file_location(name, REWARD_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ScriptedEngine:
    """Stands in for the vLLM engine (not installed here): returns the token ids of a fixed response."""

    def __init__(self, response_ids):
        self.response_ids = response_ids

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        output = SimpleNamespace(token_ids=self.response_ids, finish_reason="stop", logprobs=None)
        return SimpleNamespace(outputs=[output])


@pytest.mark.parametrize(
    "response, expected",
    [
        (sft_response(TASK) + "<|end|>", 1.0),  # the worked solution, ended by eos
        ("<think>44+19=63</think><answer>44+19</answer><|end|>", 0.1),
        ("<think>44+19=63", 0.0),  # cut off by the length limit
    ],
)
def test_openrlhf_executor_loads_and_calls_the_reward_file(response, expected):
    from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    tokenizer = build_tokenizer()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt_text(TASK)}], tokenize=False, add_generation_prompt=True
    )
    executor = SingleTurnAgentExecutor(remote_rm_url=REWARD_FILE)
    engine = ScriptedEngine(tokenizer(response, add_special_tokens=False)["input_ids"])
    sampling = SimpleNamespace(max_tokens=64, logprobs=None)
    output = asyncio.run(executor.execute(prompt, LABEL, sampling, 128, tokenizer, engine))

    assert output["reward"].tolist() == pytest.approx([expected])
    assert output["scores"].tolist() == pytest.approx([expected])
    assert output["extra_logs"]["countdown_correct"].tolist() == [float(expected == 1.0)]
    assert output["extra_logs"]["countdown_has_answer"].tolist() == [float(expected > 0.0)]
    # OpenRLHF turns the dict into an Experience; reward and every extra log become 1-element info tensors.
    experience = SamplesGenerator._process_response_into_experience(None, output, max_len=128)
    assert experience.info["reward"].tolist() == pytest.approx([expected])
    assert experience.info["countdown_correct"].tolist() == [float(expected == 1.0)]


def test_batch_call_returns_one_reward_per_query():
    reward_file = load_by_path()
    prompt = "<|user|>Use 44 19 35 to make 28.<|end|><|assistant|>"
    queries = [prompt + "<answer>44-35+19</answer><|end|>", prompt + "<answer>1</answer>", prompt + "no tag"]
    result = reward_file.reward_func(queries, [prompt] * 3, [LABEL] * 3)
    assert set(result) == {"rewards", "scores", "extra_logs"}
    assert result["rewards"].dtype == torch.float32
    assert result["rewards"].tolist() == pytest.approx([1.0, 0.1, 0.0])


def test_prompt_answer_tags_are_not_scored_when_the_query_does_not_start_with_the_prompt():
    reward_file = load_by_path()
    # A prompt that (oddly) shows an answer, and a query decoded differently: the part after the last assistant
    # marker is the response, so the prompt's example does not earn a reward.
    prompt = "<|user|>e.g. <answer>44-35+19</answer><|end|><|assistant|>"
    query = " " + prompt + "no answer"
    assert reward_file.reward_func([query], [prompt], [LABEL])["rewards"].tolist() == [0.0]


def test_the_response_is_after_the_last_assistant_marker_when_the_prompt_does_not_match():
    reward_file = load_by_path()
    # No prompt to strip: the answer shown in the user turn is not the model's.
    query = "<|user|>e.g. <answer>44-35+19</answer><|assistant|>no answer"
    assert reward_file.reward_func([query], [""], [LABEL])["rewards"].tolist() == [0.0]
    # Two assistant markers: only the text after the last one is the response.
    query = "<|assistant|><answer>44-35+19</answer><|assistant|>none"
    assert reward_file.reward_func([query], ["other"], [LABEL])["rewards"].tolist() == [0.0]


def test_reward_file_works_where_the_package_is_not_importable(monkeypatch):
    # sys.modules[name] = None makes `import name` raise ImportError: the file then loads its sibling scorer.py.
    monkeypatch.setitem(sys.modules, "openrlhf_gmpo.countdown.scorer", None)
    reward_file = load_by_path("reward_func_standalone")
    assert reward_file.score.__module__ == "countdown_scorer"
    assert reward_file.reward_func(["<answer>44-35+19</answer>"], [""], [LABEL])["rewards"].tolist() == [1.0]


@pytest.mark.parametrize(
    "label",
    [
        "not json",
        '{"numbers": [1, 2]}',
        '{"numbers": ["1"], "target": 3}',
        None,
        '{"numbers": [-1, 2], "target": 3}',  # numbers are >= 0
        '{"numbers": [true, 2], "target": 3}',  # a JSON bool is not a number here (True == 1 in Python)
        '{"numbers": [1, 2], "target": true}',
        '{"numbers": [1, 2], "target": "3"}',  # a string target would score every answer 0.1
    ],
)
def test_bad_label_names_the_label(label):
    reward_file = load_by_path()
    with pytest.raises(ValueError, match="CountDown label must"):
        reward_file.reward_func(["<answer>1</answer>"], [""], [label])
