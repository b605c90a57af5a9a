"""Math answer reward for OpenRLHF 0.11 (`--reward.remote_url path/to/math_reward.py`): 1 if the last `\\boxed{}` of
the response equals the label after light normalisation, else 0.

OpenRLHF loads this file by path inside each rollout worker and calls `reward_func(queries, prompts, labels)`, each
query being the decoded prompt + response. The label is the dataset's answer field (`answer` in MATH levels 3-5 and
DeepScaleR); a label that is itself a worked solution is reduced to its last `\\boxed{}`. The comparison is textual
(spaces, `\\left`/`\\right`, `\\dfrac`, `$`, a trailing period, degree marks and a `\\text{}` unit after a value are
ignored; other `\\text{}` is unwrapped), so it is stricter than
a symbolic verifier such as Math-Verify, which the paper used: equivalent answers written differently (0.5 vs 1/2)
score 0 here. This file imports only the standard library and torch.
"""

import re

import torch

_BOXED = "\\boxed"
_REMOVALS = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "$", " ")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` in text (nested braces matched), or None."""
    start = text.rfind(_BOXED + "{")
    if start < 0:
        return None
    depth, begin = 0, start + len(_BOXED)
    for i in range(begin, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[begin + 1 : i]
    return None  # unbalanced: the response was cut off inside the box


_DEGREES = re.compile(r"\^\{?\\circ\}?|°")  # ^{\circ}, ^\circ, °
_TRAILING_UNIT = re.compile(r"(.*\S)\s*\\(?:text|mbox|mathrm)\{[^{}]*\}")  # "5\text{ cm}": the unit after a value
_TEXT = re.compile(r"\\(?:text|mbox)\{([^{}]*)\}")


def normalize(answer: str) -> str:
    answer = _DEGREES.sub("", answer.strip())
    unit = _TRAILING_UNIT.fullmatch(answer)
    if unit is not None:
        answer = unit.group(1)
    answer = _TEXT.sub(r"\1", answer)  # what is left in \text{} is the answer itself, e.g. \text{(B)}
    answer = answer.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    for token in _REMOVALS:
        answer = answer.replace(token, "")
    return answer.rstrip(".")


def score(response: str, label: str) -> float:
    predicted = last_boxed(response)
    if predicted is None:
        return 0.0
    expected = last_boxed(label) if _BOXED in label else label
    return float(expected is not None and normalize(predicted) == normalize(expected))


def reward_func(queries, prompts, labels):
    if not len(queries) == len(prompts) == len(labels):
        raise ValueError(f"queries, prompts and labels differ in length: {len(queries)}, {len(prompts)}, {len(labels)}")
    scores = []
    for query, prompt, label in zip(queries, prompts, labels, strict=True):
        response = query[len(prompt) :] if query.startswith(prompt) else query
        scores.append(score(response, str(label)))
    rewards = torch.tensor(scores, dtype=torch.float32)
    return {"rewards": rewards, "scores": rewards.clone(), "extra_logs": {"math_correct": rewards.clone()}}
