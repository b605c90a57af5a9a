"""Reading and writing HF safetensors checkpoints one tensor at a time.

`SafetensorsCheckpoint` is a read-only mapping over a checkpoint directory that opens a tensor only when asked, so a
rank reads just its own shard of a 60 GB Qwen3-30B-A3B checkpoint. `save_hf_checkpoint` writes the streaming export
as standard per-expert safetensors shards (what `from_pretrained` and vLLM load) with an index.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping

import torch

SHARD_BYTES = 2 * 1024**3  # 2 GiB per file: bounds the host memory held while writing


def local_checkpoint_dir(name_or_path: str) -> str:
    """A local directory as is; a Hugging Face Hub id downloaded into the HF cache (weights, config and tokenizer
    files; no other weight formats), or found there under HF_HUB_OFFLINE=1, as `from_pretrained` and vLLM resolve it."""
    if os.path.isdir(name_or_path):
        return name_or_path
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id=name_or_path, allow_patterns=["*.safetensors", "*.json", "*.txt", "*.model"])
    except Exception as error:  # the hub's errors name neither the flag nor that a local path was possible
        raise FileNotFoundError(
            f"--actor.model_name_or_path {name_or_path!r} is neither a local directory nor a Hugging Face Hub model "
            f"this machine can download or find in its cache ({type(error).__name__}: {error})"
        ) from error


class SafetensorsCheckpoint(Mapping):
    """name -> tensor over `model.safetensors` or `model.safetensors.index.json` in `path`, read lazily."""

    def __init__(self, path: str):
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            self._files = {name: os.path.join(path, file) for name, file in weight_map.items()}
        elif os.path.exists(single):
            from safetensors import safe_open

            with safe_open(single, framework="pt") as f:
                self._files = dict.fromkeys(f.keys(), single)
        else:
            raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self._files[name], framework="pt") as f:
            return f.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def save_hf_checkpoint(weights: Iterator[tuple[str, torch.Tensor]], out_dir: str, *, write: bool, dtype=None) -> None:
    """Write `(name, tensor)` pairs as safetensors shards plus an index; every rank must drain `weights`
    (it runs collectives), only ranks with `write=True` touch the disk."""
    from safetensors.torch import save_file

    if write:
        os.makedirs(out_dir, exist_ok=True)
    shard, shard_bytes, weight_map, files = {}, 0, {}, []

    def flush():
        nonlocal shard, shard_bytes
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
        files.append(name)
        weight_map.update(dict.fromkeys(shard, name))
        shard, shard_bytes = {}, 0

    for name, tensor in weights:
        if not write:
            continue
        tensor = tensor.detach().to("cpu", dtype or tensor.dtype).contiguous()
        shard[name] = tensor
        shard_bytes += tensor.numel() * tensor.element_size()
        if shard_bytes >= SHARD_BYTES:
            flush()
    if not write:
        return
    if shard:
        flush()
    total = sum(os.path.getsize(os.path.join(out_dir, f)) for f in files)
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
