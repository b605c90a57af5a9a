"""Which checkpoint tags the megatron actor deletes: OpenRLHF 0.11.2's rules (max_num, max_mem, best tags)."""

import os

from openrlhf_gmpo.megatron import checkpoints

MB = 2**20


def _tag(directory, name, *, metric=None, megabytes=1, age=0):
    """A tag folder with one file of `megabytes` MB, an optional metric.json, modified `age` seconds ago."""
    path = directory / name
    path.mkdir()
    (path / "rank00000.pt").write_bytes(b"\0" * int(megabytes * MB))
    if metric is not None:
        checkpoints.write_metric(str(path), metric, "eval_acc")
    os.utime(path, (1_000_000 - age, 1_000_000 - age))
    return path


def _doomed(directory, current, max_num=3, max_mem_gb=1000.0):
    return sorted(os.path.basename(p) for p in checkpoints.tags_to_delete(str(directory), current, max_num, max_mem_gb))


def test_regular_tags_beyond_max_num_go_no_metric_first_then_worst_then_oldest(tmp_path):
    _tag(tmp_path, "global_step10", metric=0.5, age=40)
    _tag(tmp_path, "global_step20", age=30)  # no metric: the first to go
    _tag(tmp_path, "global_step30", metric=0.0, age=20)  # a metric of 0 is still a metric, and the worst here
    _tag(tmp_path, "global_step40", metric=0.9, age=10)
    _tag(tmp_path, "best_global_step40", metric=0.9, age=10)  # never evicted, not counted
    _tag(tmp_path, "global_step50", age=0)  # just written
    # max_num 3: the new tag and two others stay; of the four others, the no-metric one and the 0.0 one go.
    assert _doomed(tmp_path, "global_step50") == ["global_step20", "global_step30"]
    # max_num 1: only the new tag (and the best one) stay.
    assert _doomed(tmp_path, "global_step50", max_num=1) == ["global_step10", "global_step20", "global_step30",
                                                             "global_step40"]  # fmt: skip


def test_a_new_best_replaces_the_old_best_and_evicts_by_memory_only(tmp_path):
    _tag(tmp_path, "best_global_step10", metric=0.4)
    for step in (10, 20, 30):
        _tag(tmp_path, f"global_step{step}", metric=step / 100, megabytes=2, age=100 - step)
    _tag(tmp_path, "best_global_step30", metric=0.6)
    # Even with max_num 1 a best tag evicts no regular tag by count (OpenRLHF's rule); the old best goes.
    assert _doomed(tmp_path, "best_global_step30", max_num=1) == ["best_global_step10"]
    # Memory: the regular tags hold 6 MB (the old best is going, the new one is not counted); a 3 MB limit evicts
    # the worst metrics first (0.1, then 0.2) until 2 MB remain.
    assert _doomed(tmp_path, "best_global_step30", max_mem_gb=3 / 1024) == ["best_global_step10", "global_step10",
                                                                             "global_step20"]  # fmt: skip


def test_memory_limit_evicts_even_within_max_num(tmp_path):
    _tag(tmp_path, "global_step1", megabytes=3, age=20)
    _tag(tmp_path, "global_step2", megabytes=3, age=10)
    _tag(tmp_path, "global_step3", megabytes=3)
    # 6 MB in the two older tags, limit 4 MB: the oldest goes, then 3 MB fit.
    assert _doomed(tmp_path, "global_step3", max_mem_gb=4 / 1024) == ["global_step1"]
    assert checkpoints.prune(str(tmp_path), "global_step3", 3, 4 / 1024) == [str(tmp_path / "global_step1")]
    assert sorted(os.listdir(tmp_path)) == ["global_step2", "global_step3"]


def test_unreadable_metric_counts_as_none(tmp_path):
    path = _tag(tmp_path, "global_step1", metric=0.5)
    (path / checkpoints.METRIC_FILE).write_text("{not json")
    assert checkpoints.read_metric(str(path)) is None
    checkpoints.write_metric(str(path), None, None)
    assert checkpoints.read_metric(str(path)) is None


def test_equal_metrics_evict_the_oldest_first(tmp_path):
    # same metric 0.5 on all: the oldest (step1, age 30) goes first with max_num 3 (new + 2 kept).
    for step, age in ((1, 30), (2, 20), (3, 10)):
        _tag(tmp_path, f"global_step{step}", metric=0.5, age=age)
    _tag(tmp_path, "global_step4")
    assert _doomed(tmp_path, "global_step4") == ["global_step1"]


def test_a_tag_exactly_at_the_memory_limit_is_kept(tmp_path):
    # two older tags of 2 MB = 4 MB, limit exactly 4 MB (4/1024 GB): total <= limit, nothing goes.
    _tag(tmp_path, "global_step1", megabytes=2, age=20)
    _tag(tmp_path, "global_step2", megabytes=2, age=10)
    _tag(tmp_path, "global_step3", megabytes=2)
    assert _doomed(tmp_path, "global_step3", max_mem_gb=4 / 1024) == []


def test_memory_limit_is_in_gibibytes(tmp_path):
    # --ckpt.max_mem is in GiB, as OpenRLHF counts it: 0.004 x 2**30 = 4,294,967 bytes hold one older tag of
    # 4,200,000 bytes (the oldest goes). In decimal GB (4,000,000 bytes) neither would fit and both would go.
    _tag(tmp_path, "global_step1", megabytes=4_200_000 / MB, age=20)
    _tag(tmp_path, "global_step2", megabytes=4_200_000 / MB, age=10)
    _tag(tmp_path, "global_step3", megabytes=1)
    assert _doomed(tmp_path, "global_step3", max_mem_gb=0.004) == ["global_step1"]


def test_non_finite_metric_counts_as_none(tmp_path):
    path = _tag(tmp_path, "global_step1")
    (path / checkpoints.METRIC_FILE).write_text('{"metric_value": NaN}')  # Python's json reads NaN
    assert checkpoints.read_metric(str(path)) is None
    (path / checkpoints.METRIC_FILE).write_text("[0.5]")  # a list: .get -> AttributeError
    assert checkpoints.read_metric(str(path)) is None


def test_a_nan_metric_tag_is_evicted_before_a_tag_with_a_real_metric(tmp_path):
    _tag(tmp_path, "global_step1", metric=0.1, age=30)
    nan_tag = _tag(tmp_path, "global_step2", age=20)
    (nan_tag / checkpoints.METRIC_FILE).write_text('{"metric_value": NaN}')
    _tag(tmp_path, "global_step3")
    # max_num 2: one of the two older goes; the NaN one counts as no metric, so it goes first.
    assert _doomed(tmp_path, "global_step3", max_num=2) == ["global_step2"]
