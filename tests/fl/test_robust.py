"""Untrusted clients (issue 21): the checks and robust rules of deltamask.fl.robust, each pinned against a
slow, obvious reference and tested at its edge."""

from __future__ import annotations

import math

import numpy as np
import pytest

from deltamask.fl.robust import (
    Rejected, check_count, check_values, clip_scales, cohort_cosines, combine, fedavg, flip_outliers, nonfinite_fields, screen_reply,
)


def _slow_norm(v: np.ndarray) -> float:
    return math.sqrt(sum(float(x) ** 2 for x in v.astype(np.float64).ravel()))


def _slow_trimmed(values: list[float], t: int) -> float:
    s = sorted(values)[t : len(values) - t]
    return sum(s) / len(s)


def _slow_median(values: list[float]) -> float:
    s = sorted(values)
    k = len(s)
    return s[k // 2] if k % 2 else (s[k // 2 - 1] + s[k // 2]) / 2


@pytest.mark.parametrize("k", [2, 3, 5, 10])
def test_median_and_trimmed_mean_match_a_coordinate_loop(k: int) -> None:
    rng = np.random.default_rng(k)
    base = rng.normal(size=7).astype(np.float32)
    items = [rng.normal(size=7).astype(np.float32) * (i + 1) for i in range(k)]
    med = combine(base, items, [1.0] * k, "median").value
    tm = combine(base, items, [1.0] * k, "trimmed-mean", trim=0.2).value
    t = max(1, int(math.floor(0.2 * k)))
    for j in range(7):
        col = [float(it[j]) for it in items]
        assert med[j] == pytest.approx(_slow_median(col), rel=1e-6)
        want = _slow_trimmed(col, t) if k - 2 * t >= 1 else _slow_median(col)
        assert tm[j] == pytest.approx(want, rel=1e-6)


def test_clipping_scales_only_the_updates_beyond_factor_times_the_median_norm() -> None:
    base = np.full(4, 1.0, np.float32)
    ups = [np.array([1, 0, 0, 0]), np.array([0, 2, 0, 0]), np.array([0, 0, 3, 0]), np.array([0, 0, 0, 100])]
    items = [(base + u).astype(np.float32) for u in ups]
    res = combine(base, items, [1.0] * 4, "mean", clip=2.0)
    norms = [_slow_norm(u.astype(np.float64)) for u in ups]
    med = _slow_median(norms)  # 2.5
    assert res.norms == pytest.approx(norms)
    assert res.scales[:3] == [1.0, 1.0, 1.0]  # 3 <= 2 * 2.5: untouched
    assert res.scales[3] == pytest.approx(2 * med / 100)
    want = (sum(items[:3], np.zeros(4)) + base + ups[3] * (2 * med / 100)) / 4
    np.testing.assert_allclose(res.value, want, rtol=1e-6)


def test_clip_edge_exactly_at_the_limit_is_not_clipped() -> None:
    scales, med = clip_scales([1.0, 2.0, 3.0, 6.0], 2.4)  # median 2.5 -> limit 6.0
    assert med == 2.5 and scales == [1.0, 1.0, 1.0, 1.0]
    scales, _ = clip_scales([1.0, 2.0, 3.0, np.nextafter(6.0, 7.0)], 2.4)
    assert scales[3] < 1.0
    assert clip_scales([5.0, 100.0], 0.0)[0] == [1.0, 1.0]  # 0 = off


def test_mean_without_clipping_is_exactly_fedavg() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(size=50).astype(np.float32)
    items = [rng.normal(size=50).astype(np.float32) for _ in range(5)]
    w = [3.0, 1.0, 2.0, 5.0, 1.0]
    res = combine(base, items, w, "mean", clip=100.0)
    assert np.array_equal(res.value, fedavg(items, w))


def test_fedavg_refuses_weights_that_do_not_sum_to_a_positive_value() -> None:
    a = [np.ones(3, np.float32), np.ones(3, np.float32)]
    for w in ([0.0, 0.0], [1.0, -1.0], [float("nan"), 1.0], [float("inf"), 1.0]):
        with pytest.raises(ValueError):
            fedavg(a, w)


def test_flip_cap_edge() -> None:
    n = 1000
    assert flip_outliers({0: 50, 1: 10}, n, 50, 0.0) == {}
    out = flip_outliers({0: 51, 1: 10}, n, 50, 0.0)
    assert list(out) == [0] and "over the cap 50" in out[0]
    assert flip_outliers({0: 1000}, n, None, 0.0) == {}


def test_flip_outlier_edge_and_minimum_cohort() -> None:
    assert flip_outliers({0: 10, 1: 10, 2: 30}, 10**6, None, 3.0) == {}  # exactly 3x the median
    out = flip_outliers({0: 10, 1: 10, 2: 31}, 10**6, None, 3.0)
    assert list(out) == [2] and "median" in out[2]
    assert flip_outliers({0: 10, 1: 1000}, 10**6, None, 3.0) == {}  # fewer than 3 replies: no cohort
    assert flip_outliers({0: 10, 1: 10, 2: 1000}, 10**6, None, 0.0) == {}  # off


def test_check_values_edges() -> None:
    check_values(np.array([1e4, -1e4], np.float32), 1e4, "head")
    with pytest.raises(Rejected, match="beyond max_abs_param"):
        check_values(np.array([0.0, np.nextafter(np.float32(1e4), np.float32(np.inf))], np.float32), 1e4, "head")
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(Rejected, match="non-finite"):
            check_values(np.array([0.0, bad]), 1e4, "head")


def test_screen_reply_takes_the_servers_sample_count_and_finite_metrics() -> None:
    screen_reply(3, 120, {"train_loss": 0.5, "num_keys": 7.0}, 120)
    screen_reply(3, 120.0, {}, 120)
    for claimed in (121, 119, 10**9, 0, -1, 120.5, "120", None, float("nan")):
        with pytest.raises(Rejected, match="num_samples"):
            screen_reply(3, claimed, {}, 120)
    for metrics in ({"x": float("nan")}, {"x": float("inf")}, {"x": "1"}, {"x": True}, {"x": None}):
        with pytest.raises(Rejected, match="metric"):
            screen_reply(3, 120, metrics, 120)
    screen_reply(3, 120, {f"m{i}": 1.0 for i in range(64)}, 120)
    with pytest.raises(Rejected, match="at most 64"):
        screen_reply(3, 120, {f"m{i}": 1.0 for i in range(65)}, 120)


def test_check_count_edges() -> None:
    assert check_count("num_keys", 0.0, 10) == 0 and check_count("num_keys", 10.0, 10) == 10
    for bad in (11.0, -1.0, 2.5, float("nan"), float("inf")):
        with pytest.raises(Rejected):
            check_count("num_keys", bad, 10)


def test_nonfinite_fields_names_the_arrays() -> None:
    assert nonfinite_fields({"a": np.ones(3), "b": None, "c": np.arange(3)}) == []
    assert nonfinite_fields({"a": np.array([1.0, np.nan]), "b": np.array([np.inf]), "c": np.ones(2)}) == ["a", "b"]


def _slow_cohort(updates: list[np.ndarray]) -> list[float]:
    cols = list(zip(*[[float(x) for x in u.ravel()] for u in updates]))
    ref = [_slow_median(list(c)) for c in cols]
    nr = math.sqrt(math.fsum(r * r for r in ref))
    out = []
    for u in updates:
        g = [float(x) for x in u.ravel()]
        n = math.sqrt(math.fsum(x * x for x in g))
        out.append(math.fsum(a * b for a, b in zip(g, ref)) / (n * nr) if n and nr else 0.0)
    return out


@pytest.mark.parametrize("k", [3, 4, 10])
def test_cohort_cosines_match_a_slow_reference(k: int) -> None:
    rng = np.random.default_rng(k)
    common = rng.normal(size=(6, 5))
    ups = [(common + rng.normal(scale=0.7, size=(6, 5))).astype(np.float32) for _ in range(k)]
    ups[0] = -ups[0]  # one client pulls the other way: the lowest cosine, below 0
    ups[-1] = np.zeros((6, 5), np.float32)  # no update: cosine 0
    got = cohort_cosines(ups)
    np.testing.assert_allclose(got, _slow_cohort(ups), rtol=1e-9, atol=1e-12)
    assert got[-1] == 0.0
    if k >= 4:  # a cohort of honest updates outvotes the one pulling the other way
        assert got[0] < 0 < min(got[1:-1])


def test_cohort_cosines_need_three_updates() -> None:
    ups = [np.ones(4, np.float32), -np.ones(4, np.float32)]
    assert cohort_cosines(ups) is None and cohort_cosines([]) is None
    assert cohort_cosines([*ups, np.ones(4, np.float32)]) == pytest.approx([1.0, -1.0, 1.0])
