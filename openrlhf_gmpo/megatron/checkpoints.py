"""Which checkpoint folders the megatron actor keeps: OpenRLHF 0.11.2's rules for its DeepSpeed actor.

- at most `--ckpt.max_num` regular tags (`global_step*`), the one just written included;
- all tags together within `--ckpt.max_mem` GB, the one just written not counted (OpenRLHF checks before it saves);
- best tags (`best*`, written by `save_best_checkpoint`) are never evicted and do not count toward max_num; writing a
  new best removes the previous one;
- eviction order: tags without a recorded metric first, then the worst metric, then the oldest.

Each tag folder records its eval metric in `metric.json` ({"metric_key", "metric_value"}), as OpenRLHF does.
"""

from __future__ import annotations

import json
import math
import os
import shutil

METRIC_FILE = "metric.json"


def is_best(tag: str) -> bool:
    return tag.startswith("best")


def rank_state_file(path: str, rank: int) -> str:
    """One file per rank in a tag folder: its model shard, optimizer state dict, schedule and client states."""
    return os.path.join(path, f"rank{rank:05d}.pt")


def parameter_state_file(path: str, rank: int) -> str:
    """One file per rank: the first rank of each data-parallel group writes its group's optimizer shard, and with
    expert parallelism there are several such groups (each EP rank's experts), so one shared name would be written
    by all of them. The same rank reads it back (same parallel sizes)."""
    return os.path.join(path, f"optimizer_parameter_state_rank{rank:05d}.pt")


def write_metric(tag_dir: str, value: float | None, key: str | None) -> None:
    with open(os.path.join(tag_dir, METRIC_FILE), "w") as f:
        json.dump({"metric_key": key, "metric_value": value}, f, indent=2, sort_keys=True)


def read_metric(tag_dir: str) -> float | None:
    """The tag's recorded metric; None when there is none or it is unreadable (such tags are evicted first)."""
    try:
        with open(os.path.join(tag_dir, METRIC_FILE)) as f:
            value = json.load(f).get("metric_value")
        value = float(value)
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    return value if math.isfinite(value) else None


def tags_to_delete(directory: str, current_tag: str, max_num: int, max_mem_gb: float) -> list[str]:
    """Paths of the tag folders in `directory` to delete after `current_tag` was written (see the module docstring)."""
    tags = [entry for entry in os.scandir(directory) if entry.is_dir() and entry.name != current_tag]
    old_best = [entry for entry in tags if is_best(entry.name)] if is_best(current_tag) else []
    regular = [entry for entry in tags if not is_best(entry.name)]
    metrics = {entry.path: read_metric(entry.path) for entry in regular}

    # Eviction order: no metric first, then the worst metric, then the oldest.
    def eviction_order(entry):
        metric = metrics[entry.path]
        return (metric is not None, metric if metric is not None else -math.inf, entry.stat().st_mtime)

    regular.sort(key=eviction_order)
    sizes = {entry.path: _folder_bytes(entry.path) for entry in tags if entry not in old_best}
    total, max_bytes = sum(sizes.values()), max_mem_gb * 2**30
    # A best tag is written without a count limit on the regular ones (OpenRLHF's rule), only the memory limit.
    count_limit = len(regular) if is_best(current_tag) else max(max_num - 1, 0)
    evicted = []
    for entry in regular:
        if len(regular) - len(evicted) <= count_limit and total <= max_bytes:
            break
        evicted.append(entry)
        total -= sizes[entry.path]
    return [entry.path for entry in old_best + evicted]


def prune(directory: str, current_tag: str, max_num: int, max_mem_gb: float) -> list[str]:
    """Delete what `tags_to_delete` names; returns the deleted paths."""
    doomed = tags_to_delete(directory, current_tag, max_num, max_mem_gb)
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def _folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)
