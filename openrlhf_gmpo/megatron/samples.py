"""OpenRLHF experiences as the megatron actor batches them: keys that find a sample again, left-padded batches."""

from __future__ import annotations

import hashlib

import torch


def sequence_key(sequence: torch.Tensor, attention_mask: torch.Tensor) -> str:
    """Identifies a sample by its valid tokens, so recorded routing finds it again however it is re-batched."""
    return hashlib.sha1(sequence[attention_mask.bool()].cpu().numpy().tobytes()).hexdigest()


def remember_routing(store: dict, sequences, attention_mask, per_sequence: list[torch.Tensor]) -> None:
    """Keep each sequence's recorded routing under its `sequence_key`."""
    for i, routing in enumerate(per_sequence):
        store[sequence_key(sequences[i], attention_mask[i])] = routing


def attach_routing(samples: list[dict], store: dict) -> None:
    """Give each sample the routing recorded for it (`remember_routing`), for replay in the update."""
    keys = [sequence_key(sample["sequences"], sample["attention_mask"]) for sample in samples]
    missing = sum(key not in store for key in keys)
    if missing:
        raise RuntimeError(
            f"routing replay: no recorded routing for {missing} of {len(samples)} samples ({len(store)} recorded); "
            "every sample must pass through the actor's `forward` (the old-policy pass) before `fit`"
        )
    for sample, key in zip(samples, keys, strict=True):
        sample["routing"] = store[key]


def left_pad_collate(samples: list[dict]) -> dict:
    """Stack per-sample rows of different lengths by padding on the left (sequence and action columns alike), so the
    response stays the last A columns of each row."""
    seq_len = max(s["sequences"].shape[0] for s in samples)
    num_actions = max(s["action_mask"].shape[0] for s in samples)

    def pad(key: str, width: int) -> torch.Tensor:
        rows = [torch.nn.functional.pad(s[key], (width - s[key].shape[0], 0)) for s in samples]
        return torch.stack(rows)

    batch = {key: pad(key, seq_len) for key in ("sequences", "attention_mask")}
    for key in ("action_mask", "old_log_probs", "advantages", "rollout_log_probs"):
        if samples[0].get(key) is not None:
            batch[key] = pad(key, num_actions)
    batch["attention_mask"] = batch["attention_mask"].bool()
    batch["action_mask"] = batch["action_mask"].bool()
    return batch
