"""Pass/fail per algorithm against the preset's thresholds, keeping the numbers that decided each check."""

import math

from openrlhf_gmpo.stability.config import VerdictConfig


def judge(records: list[dict], start_val_accuracy: float, thresholds: VerdictConfig) -> dict:
    """Verdict for one algorithm's step records (metrics.jsonl lines of that algorithm, in step order).

    Checks: every logged number finite; token ratios within [1/max_token_ratio, max_token_ratio] at every step;
    KL to the starting model at most max_kl at every step; the last validation accuracy at least the warm-start
    accuracy minus val_accuracy_tolerance. A NaN anywhere fails the first check and, through the comparisons, any check
    that reads it.
    """
    if not records:
        return {"passed": False, "steps": 0, "checks": {}, "reason": "no steps were run"}
    non_finite = [
        {"step": r.get("step"), "key": k}
        for r in records
        for k, v in r.items()
        if isinstance(v, float) and not math.isfinite(v)
    ]
    ratio_low = min(r["token_ratio_min"] for r in records)
    ratio_high = max(r["token_ratio_max"] for r in records)
    if any(math.isnan(r["token_ratio_min"]) or math.isnan(r["token_ratio_max"]) for r in records):
        ratio_low = ratio_high = math.nan
    bound = thresholds.max_token_ratio
    kl_max = max(r["kl_ref"] for r in records)
    if any(math.isnan(r["kl_ref"]) for r in records):
        kl_max = math.nan
    evaluated = [r for r in records if "val_accuracy" in r]
    final_val = evaluated[-1]["val_accuracy"] if evaluated else math.nan
    floor = start_val_accuracy - thresholds.val_accuracy_tolerance
    checks = {
        "finite": {"passed": not non_finite, "non_finite": non_finite[:10], "count": len(non_finite)},
        "token_ratio_range": {
            "passed": _finite(ratio_low, ratio_high) and 1 / bound <= ratio_low and ratio_high <= bound,
            "min": ratio_low,
            "max": ratio_high,
            "allowed": [1 / bound, bound],
        },
        "kl_ref": {
            "passed": _finite(kl_max) and kl_max <= thresholds.max_kl,
            "max": kl_max,
            "allowed_max": thresholds.max_kl,
        },
        "val_accuracy": {
            "passed": _finite(final_val) and final_val >= floor,
            "start": start_val_accuracy,
            "final": final_val,
            "final_step": evaluated[-1]["step"] if evaluated else None,
            "allowed_min": floor,
        },
    }
    return {
        "passed": all(c["passed"] for c in checks.values()),
        "steps": records[-1]["step"],
        "checks": checks,
    }


def _finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)
