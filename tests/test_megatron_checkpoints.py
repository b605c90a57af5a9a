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
