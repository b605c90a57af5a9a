"""Stability presets: load a YAML file, check every key, type and range, and return typed dataclasses.

A preset is a name shipped in `presets/` (`tiny`, `200m`) or a path to a YAML file. Unknown keys raise a ValueError
that names the key and the closest valid one, so a typo never silently falls back to a default.
"""

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PRESET_DIR = Path(__file__).parent / "presets"
DECODE_CACHES = ("dynamic", "static")


@dataclass(frozen=True)
class ModelConfig:
    size: str  # a size known to openrlhf_gmpo.countdown.model ("tiny", "200m")


@dataclass(frozen=True)
class DataConfig:
    train_tasks: int
    val_tasks: int
    min_numbers: int
    max_numbers: int
    max_value: int  # numbers are drawn from 1..max_value
    max_target: int  # targets are drawn from 1..max_target


@dataclass(frozen=True)
class SFTConfig:
    steps: int
    batch_size: int
    lr: float
    min_val_accuracy: float  # reported against; RL from a model that never answers correctly learns nothing


@dataclass(frozen=True)
class RLConfig:
    steps: int
    prompts_per_step: int
    samples_per_prompt: int
    mini_batch_size: int
    epochs: int
    lr: float
    weight_decay: float
    grad_clip: float
    max_new_tokens: int
    adv_eps: float
    eval_every: int
    eval_tasks: int
    checkpoint_every: int
    decode_cache: str  # "dynamic" or "static" (fixed-size KV cache, compiled decode step on CUDA)

    @property
    def rollout_batch_size(self) -> int:
        return self.prompts_per_step * self.samples_per_prompt


@dataclass(frozen=True)
class AlgoConfig:
    loss: str  # a name registered in openrlhf_gmpo.losses
    clip_eps_low: float
    clip_eps_high: float


@dataclass(frozen=True)
class VerdictConfig:
    max_token_ratio: float  # token ratios must stay within [1/x, x]
    max_kl: float  # k3 KL to the starting model, per token
    val_accuracy_tolerance: float  # final val accuracy may fall at most this far below the start


@dataclass(frozen=True)
class StabilityConfig:
    name: str
    seed: int
    threads: int
    model: ModelConfig
    data: DataConfig
    sft: SFTConfig
    rl: RLConfig
    algos: dict[str, AlgoConfig] = field(default_factory=dict)
    verdict: VerdictConfig | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# (low, high) inclusive bounds per numeric field; None means unbounded on that side.
_RANGES: dict[str, tuple[float | None, float | None]] = {
    "seed": (0, None),
    "threads": (1, 256),
    "data.train_tasks": (1, None),
    "data.val_tasks": (1, None),
    "data.min_numbers": (3, 5),
    "data.max_numbers": (3, 5),
    "data.max_value": (1, 10_000),
    "data.max_target": (1, 10_000),
    "sft.steps": (0, None),
    "sft.batch_size": (1, None),
    "sft.lr": (1e-8, 1.0),
    "sft.min_val_accuracy": (0.0, 1.0),
    "rl.steps": (1, None),
    "rl.prompts_per_step": (1, None),
    "rl.samples_per_prompt": (2, None),
    "rl.mini_batch_size": (1, None),
    "rl.epochs": (1, 64),
    "rl.lr": (1e-9, 1.0),
    "rl.weight_decay": (0.0, 1.0),
    "rl.grad_clip": (1e-6, None),
    "rl.max_new_tokens": (1, 4096),
    "rl.adv_eps": (1e-12, 1.0),
    "rl.eval_every": (1, None),
    "rl.eval_tasks": (1, None),
    "rl.checkpoint_every": (1, None),
    "algo.clip_eps_low": (1e-6, 10.0),  # the losses need a clip > 0
    "algo.clip_eps_high": (1e-6, 10.0),
    "verdict.max_token_ratio": (1.0, None),
    "verdict.max_kl": (0.0, None),
    "verdict.val_accuracy_tolerance": (0.0, 1.0),
}


def resolve_preset_path(preset: str) -> Path:
    """`tiny` -> the shipped presets/tiny.yaml; anything else must be an existing YAML file."""
    shipped = PRESET_DIR / f"{preset}.yaml"
    if shipped.is_file():
        return shipped
    path = Path(preset)
    if path.is_file():
        return path
    names = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    raise ValueError(f"neither a shipped preset ({', '.join(names)}) nor an existing YAML file")


def load_preset(preset: str) -> StabilityConfig:
    """The preset's config; ValueError says what is wrong in it (the caller names the preset: `--preset X: ...`)."""
    path = resolve_preset_path(preset)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"not valid YAML ({error})") from error
    return parse_config(raw, name=path.stem)


def parse_config(raw: Any, name: str) -> StabilityConfig:
    """Build a StabilityConfig from a plain dict (as loaded from YAML), raising ValueError on the first bad value."""
    if not isinstance(raw, dict):
        raise ValueError(f"expected a mapping at the top level, got {type(raw).__name__}")
    top = _check_keys(raw, StabilityConfig, "", skip={"name"})
    algos_raw = top.get("algos")
    if not isinstance(algos_raw, dict) or not algos_raw:
        raise ValueError("algos: expected a non-empty mapping of algorithm name -> {loss, clip_eps_low, clip_eps_high}")
    cfg = StabilityConfig(
        name=name,
        seed=_number(top, "seed", int, ""),
        threads=_number(top, "threads", int, ""),
        model=_section(top, "model", ModelConfig),
        data=_section(top, "data", DataConfig),
        sft=_section(top, "sft", SFTConfig),
        rl=_section(top, "rl", RLConfig),
        algos={str(k): _section(algos_raw, k, AlgoConfig, range_prefix="algo", prefix="algos.") for k in algos_raw},
        verdict=_section(top, "verdict", VerdictConfig),
    )
    _check_relations(cfg)
    return cfg


def _check_keys(raw: dict, cls: type, where: str, skip: set[str] = frozenset()) -> dict:
    valid = [f.name for f in dataclasses.fields(cls) if f.name not in skip]
    for key in raw:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.0)
            hint = f"; did you mean '{where}{close[0]}'?" if close else ""
            raise ValueError(f"unknown key '{where}{key}'{hint} (valid: {', '.join(valid)})")
    missing = [k for k in valid if k not in raw]
    if missing:
        raise ValueError(f"missing key '{where}{missing[0]}'")
    return raw


def _section(parent: dict, key: str, cls: type, range_prefix: str | None = None, prefix: str = "") -> Any:
    path = f"{prefix}{key}"
    raw = parent[key]
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping, got {raw!r}")
    _check_keys(raw, cls, f"{path}.")
    values = {}
    for f in dataclasses.fields(cls):
        kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
        range_key = f"{range_prefix or key}.{f.name}"
        values[f.name] = _number(raw, f.name, kind, f"{path}.", range_key=range_key)
    return cls(**values)


def _number(raw: dict, key: str, kind: type, where: str, range_key: str | None = None) -> Any:
    value = raw[key]
    full = f"{where}{key}"
    # YAML reads `1e-5` as a string (no dot): accept numeric strings for floats, but never bools for numbers.
    if kind is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{full}: expected a number, got {value!r}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"{full}: expected {kind.__name__}, got {value!r} ({type(value).__name__})")
    if kind is float and value != value:
        raise ValueError(f"{full}: NaN is not allowed")
    low, high = _RANGES.get(range_key or key.lstrip("."), (None, None))
    if low is not None and value < low or high is not None and value > high:
        raise ValueError(f"{full}: {value!r} is outside the allowed range [{low}, {'inf' if high is None else high}]")
    return value


def _check_relations(cfg: StabilityConfig) -> None:
    from openrlhf_gmpo.countdown.model import SIZES
    from openrlhf_gmpo.countdown.tasks import task_space_bound
    from openrlhf_gmpo.losses import LOSS_NAMES

    if cfg.model.size not in SIZES:
        raise ValueError(f"model.size: {cfg.model.size!r} is not one of {', '.join(SIZES)}")
    if cfg.data.min_numbers > cfg.data.max_numbers:
        raise ValueError(f"data.min_numbers ({cfg.data.min_numbers}) exceeds data.max_numbers ({cfg.data.max_numbers})")
    if cfg.rl.rollout_batch_size % cfg.rl.mini_batch_size:
        raise ValueError(
            f"rl.mini_batch_size ({cfg.rl.mini_batch_size}) must divide the rollout batch "
            f"(prompts_per_step * samples_per_prompt = {cfg.rl.rollout_batch_size})"
        )
    data = cfg.data  # numbers and targets start at 1: generate_tasks' defaults, which split_tasks keeps
    allowed = task_space_bound(data.min_numbers, data.max_numbers, 1, data.max_value, 1, data.max_target)
    if data.train_tasks + data.val_tasks > allowed:
        raise ValueError(
            f"data.train_tasks + data.val_tasks ({data.train_tasks} + {data.val_tasks}) exceeds the {allowed} distinct "
            f"tasks that data.min_numbers..max_numbers {data.min_numbers}..{data.max_numbers}, data.max_value "
            f"{data.max_value} and data.max_target {data.max_target} allow"
        )
    if cfg.rl.decode_cache not in DECODE_CACHES:
        raise ValueError(f"rl.decode_cache: {cfg.rl.decode_cache!r} is not one of {', '.join(DECODE_CACHES)}")
    if cfg.rl.eval_tasks > cfg.data.val_tasks:
        raise ValueError(f"rl.eval_tasks ({cfg.rl.eval_tasks}) exceeds data.val_tasks ({cfg.data.val_tasks})")
    if cfg.rl.prompts_per_step > cfg.data.train_tasks:  # each step draws distinct training tasks
        raise ValueError(
            f"rl.prompts_per_step ({cfg.rl.prompts_per_step}) exceeds data.train_tasks ({cfg.data.train_tasks})"
        )
    for algo_name, algo in cfg.algos.items():
        if algo.loss not in LOSS_NAMES:
            close = difflib.get_close_matches(algo.loss, list(LOSS_NAMES), n=1, cutoff=0.0)
            raise ValueError(
                f"algos.{algo_name}.loss: unknown loss {algo.loss!r}; did you mean {close[0]!r}? "
                f"(known: {', '.join(LOSS_NAMES)})"
            )
