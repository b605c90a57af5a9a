"""CountDown glue for the stability loop: task splits, token encoding, SFT batches, greedy evaluation."""

import json
from pathlib import Path

import torch

from openrlhf_gmpo.countdown.prompts import prompt_text, sft_response
from openrlhf_gmpo.countdown.scorer import SCORE_CORRECT, score
from openrlhf_gmpo.countdown.tasks import CountdownTask, generate_tasks
from openrlhf_gmpo.stability import state
from openrlhf_gmpo.stability.config import DataConfig
from openrlhf_gmpo.stability.engine import PolicyEngine, TokenBatch

# Greedy evaluation works through the validation prompts in chunks of this many: the 200m preset's rollout batch, so
# with a static cache its evaluation decodes in the shape the RL step compiled (one CUDA-graph compile per process).
EVAL_BATCH = 512


def split_tasks(data: DataConfig, seed: int) -> tuple[list[CountdownTask], list[CountdownTask]]:
    """Disjoint train and validation tasks, the same for the same seed (generate_tasks draws distinct tasks)."""
    tasks = generate_tasks(
        data.train_tasks + data.val_tasks,
        seed,
        min_numbers=data.min_numbers,
        max_numbers=data.max_numbers,
        max_value=data.max_value,
        max_target=data.max_target,
    )
    return tasks[: data.train_tasks], tasks[data.train_tasks :]


def cached_split_tasks(data: DataConfig, seed: int, cache_dir: Path) -> tuple[list[CountdownTask], list[CountdownTask]]:
    """split_tasks, stored as JSON under cache_dir: drawing the 200m preset's 10.5k tasks takes ~30 s."""
    path = cache_dir / f"tasks-seed{seed}-{state.config_fingerprint(data)}.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        return tuple(
            [CountdownTask(tuple(t["numbers"]), t["target"]) for t in saved[split]] for split in ("train", "val")
        )
    train, val = split_tasks(data, seed)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(
        json.dumps(
            {
                split: [{"numbers": list(t.numbers), "target": t.target} for t in tasks]
                for split, tasks in (("train", train), ("val", val))
            }
        )
    )
    tmp.replace(path)
    return train, val


def encode_prompt(tokenizer, task: CountdownTask) -> list[int]:
    """Chat-formatted prompt ending in the assistant tag, as OpenRLHF's --data.apply_chat_template would build it."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt_text(task)}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer.encode(text, add_special_tokens=False)


def sft_examples(tokenizer, tasks: list[CountdownTask]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, worked solution ids + EOS, so the model learns to stop) of each task.

    Built once before the warm start's steps: solving each step's batch instead cost ~1.3 s per 256 tasks of the
    200m preset, 20 minutes of its 1000-step warm start with the GPU waiting (now ~20 s once for its 10k tasks).
    """
    eos = tokenizer.eos_token_id
    return [
        (encode_prompt(tokenizer, task), tokenizer.encode(sft_response(task), add_special_tokens=False) + [eos])
        for task in tasks
    ]


def sft_batch(pad_id: int, examples: list[tuple[list[int], list[int]]], device: torch.device) -> TokenBatch:
    """Prompts left-padded and solutions right-padded: the same layout generate() produces."""
    prompts = [prompt for prompt, _ in examples]
    responses = [response for _, response in examples]
    width_p, width_r = max(map(len, prompts)), max(map(len, responses))
    ids = torch.full((len(examples), width_p + width_r), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        ids[row, width_p - len(p) : width_p] = torch.tensor(p)
        ids[row, width_p : width_p + len(r)] = torch.tensor(r)
        mask[row, width_p - len(p) : width_p + len(r)] = 1
    return TokenBatch(ids.to(device), mask.to(device), width_p)


def decode_responses(tokenizer, batch: TokenBatch) -> list[str]:
    return tokenizer.batch_decode(batch.response_ids.cpu(), skip_special_tokens=False)


def rewards_for(texts: list[str], tasks: list[CountdownTask]) -> torch.Tensor:
    return torch.tensor([score(text, t.numbers, t.target) for text, t in zip(texts, tasks, strict=True)])


def evaluate(engine: PolicyEngine, tokenizer, tasks: list[CountdownTask], max_new_tokens: int) -> dict[str, float]:
    """Greedy decoding on tasks: accuracy (share scoring 1.0), mean reward and mean response length in tokens."""
    rewards, lengths = [], []
    for start in range(0, len(tasks), EVAL_BATCH):
        chunk = tasks[start : start + EVAL_BATCH]
        batch = engine.generate(
            [encode_prompt(tokenizer, t) for t in chunk], max_new_tokens=max_new_tokens, greedy=True, seed=0
        )
        rewards.append(rewards_for(decode_responses(tokenizer, batch), chunk))
        lengths.append(batch.action_mask.sum(dim=1).float().cpu())
    reward = torch.cat(rewards)
    return {
        "val_accuracy": (reward == SCORE_CORRECT).float().mean().item(),
        "val_reward": reward.mean().item(),
        "val_response_length": torch.cat(lengths).mean().item(),
    }
