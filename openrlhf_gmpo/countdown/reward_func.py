"""CountDown reward for OpenRLHF 0.11.2: pass this file's path as `--reward.remote_url`.

OpenRLHF loads it with importlib by file path inside each rollout worker and calls
`reward_func(queries, prompts, labels)` (openrlhf/utils/agent.py, SingleTurnAgentExecutor), where each query is the
decoded prompt + response (special tokens kept) and each label is the dataset's label field, here the JSON string
'{"numbers": [..], "target": N}' written by `openrlhf-gmpo countdown data`. It returns tensors of shape [len(queries)]:
"rewards" (used for advantages), "scores" (logged) and "extra_logs" (each key logged as train/<key>).
"""

import importlib.util
from pathlib import Path

import torch

try:
    from openrlhf_gmpo.countdown.scorer import SCORE_CORRECT, SCORE_NO_ANSWER, decode_label, score
except ImportError:  # loaded by path where the package is not installed: the scorer is a stdlib-only sibling file
    _spec = importlib.util.spec_from_file_location("countdown_scorer", Path(__file__).with_name("scorer.py"))
    _scorer = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_scorer)
    SCORE_CORRECT, SCORE_NO_ANSWER = _scorer.SCORE_CORRECT, _scorer.SCORE_NO_ANSWER
    decode_label, score = _scorer.decode_label, _scorer.score

ASSISTANT_MARKER = "<|assistant|>"


def extract_response(query: str, prompt: str) -> str:
    """The model's part of a query: after the prompt when the query starts with it (our tokenizer round-trips
    exactly), else after the last assistant marker, else the whole query (a prompt holds no <answer> tag)."""
    if prompt and query.startswith(prompt):
        return query[len(prompt) :]
    marker = query.rfind(ASSISTANT_MARKER)
    if marker >= 0:
        return query[marker + len(ASSISTANT_MARKER) :]
    return query


def reward_func(queries, prompts, labels):
    if not len(queries) == len(prompts) == len(labels):
        raise ValueError(f"queries, prompts and labels differ in length: {len(queries)}, {len(prompts)}, {len(labels)}")
    scores = []
    for query, prompt, label in zip(queries, prompts, labels, strict=True):
        numbers, target = decode_label(label)
        scores.append(score(extract_response(query, prompt), numbers, target))
    rewards = torch.tensor(scores, dtype=torch.float32)
    return {
        "rewards": rewards,
        "scores": rewards.clone(),
        "extra_logs": {
            "countdown_correct": (rewards == SCORE_CORRECT).float(),
            "countdown_has_answer": (rewards != SCORE_NO_ANSWER).float(),
        },
    }
