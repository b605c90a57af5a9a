"""Shared pieces of the stability tests: a miniature version of the tiny preset, written as a YAML file."""

import copy
from pathlib import Path

import yaml

from openrlhf_gmpo.stability.config import PRESET_DIR

# Overrides that make the tiny preset run in seconds: few tasks, a short SFT, 4 RL steps of 8 rollouts.
MINI = {
    "threads": 1,
    "data": {"train_tasks": 64, "val_tasks": 16},
    "sft": {"steps": 20, "batch_size": 16},
    "rl": {
        "steps": 4,
        "prompts_per_step": 2,
        "samples_per_prompt": 4,
        "mini_batch_size": 4,
        "epochs": 1,
        "max_new_tokens": 20,
        "eval_every": 2,
        "eval_tasks": 8,
        "checkpoint_every": 2,
        "decode_cache": "dynamic",
    },
}


def tiny_raw() -> dict:
    """The shipped tiny preset as a plain dict."""
    return yaml.safe_load((PRESET_DIR / "tiny.yaml").read_text())


def merged(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def write_mini_preset(directory: Path, name: str = "mini") -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(merged(tiny_raw(), MINI)))
    return path
