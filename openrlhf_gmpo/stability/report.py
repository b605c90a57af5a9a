"""Run outputs: metrics.jsonl lines, verdict.json, report.md and the plots."""

import json
import math
from pathlib import Path

from openrlhf_gmpo.stability.plots import plot_curves, plot_ratio_range

# (key, label) rows of each algorithm's table in report.md
TABLE_ROWS = (
    ("val_accuracy", "validation accuracy"),
    ("train_reward", "train mean reward"),
    ("token_ratio_min", "token ratio min"),
    ("token_ratio_max", "token ratio max"),
    ("seq_ratio_min", "sequence ratio min"),
    ("seq_ratio_max", "sequence ratio max"),
    ("clip_frac_low", "clip fraction low"),
    ("clip_frac_high", "clip fraction high"),
    ("entropy", "token entropy"),
    ("kl_ref", "KL to start (k3)"),
    ("grad_norm", "grad norm"),
    ("expert_max_share", "max expert share"),
    ("router_entropy", "router entropy (normalised)"),
    ("response_length", "response length (tokens)"),
    ("step_time_s", "step time (s)"),
)


def _plain(value):
    """Strict JSON: NaN/inf become the strings "NaN"/"Infinity"/"-Infinity" instead of invalid bare literals."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def json_line(record: dict) -> str:
    return json.dumps(_plain(record), sort_keys=True, allow_nan=False)


_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def read_records(path: Path) -> list[dict]:
    """The step records of a metrics jsonl file, non-finite numbers restored (the inverse of json_line). A last line
    cut short (the run was writing it, or was killed while it did) is skipped."""
    records = []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: not a JSON record") from None
        records.append({k: _NON_FINITE.get(v, v) if isinstance(v, str) else v for k, v in record.items()})
    return records


def write_json(obj, path: Path) -> None:
    path.write_text(json.dumps(_plain(obj), indent=2, allow_nan=False) + "\n")


def write_outputs(out_dir: Path, records_by_algo: dict[str, list[dict]], verdicts: dict, header: dict, cfg) -> None:
    """verdict.json, the two plots and report.md; header holds the run facts listed at the top of the report."""
    write_json(verdicts, out_dir / "verdict.json")
    plot_ratio_range(records_by_algo, cfg.verdict.max_token_ratio, out_dir / "ratio_range.png")
    plot_curves(records_by_algo, header["warm-start val accuracy"], out_dir / "training_curves.png")
    (out_dir / "report.md").write_text(render_report(records_by_algo, verdicts, header))


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _nan_aware_extremes(values: list[float]) -> tuple[float, float]:
    """min and max, both NaN if any value is: Python's min/max skip a NaN in some positions and hide a diverged run."""
    if any(math.isnan(v) for v in values):
        return math.nan, math.nan
    return min(values), max(values)


def render_report(records_by_algo: dict[str, list[dict]], verdicts: dict, header: dict) -> str:
    lines = ["# Stability report", ""]
    lines += [f"- {key}: {_fmt(value)}" for key, value in header.items()]
    lines += ["", "Plots: `ratio_range.png` (token ratio min-max band per step), `training_curves.png`.", ""]
    for algo, records in records_by_algo.items():
        verdict = verdicts[algo]
        lines += [f"## {algo}: {'PASS' if verdict['passed'] else 'FAIL'} after {verdict['steps']} steps", ""]
        lines += ["| metric | start | end | min | max |", "|---|---|---|---|---|"]
        for key, label in TABLE_ROWS:
            values = [r[key] for r in records if key in r]
            if values:
                low, high = _nan_aware_extremes(values)
                lines.append(f"| {label} | {_fmt(values[0])} | {_fmt(values[-1])} | {_fmt(low)} | {_fmt(high)} |")
        lines += ["", "| check | passed | numbers |", "|---|---|---|"]
        for name, check in verdict["checks"].items():
            numbers = ", ".join(f"{k}={_fmt(v)}" for k, v in check.items() if k not in ("passed", "non_finite"))
            lines.append(f"| {name} | {'yes' if check['passed'] else 'NO'} | {numbers} |")
        lines.append("")
    return "\n".join(lines)
