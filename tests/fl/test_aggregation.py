import numpy as np

from deltamask.codecs.dense import theta_from_counts
from deltamask.fl.aggregation import MaskAggregator, fedavg, init_state, posterior


def _state(n: int = 50):
    return init_state(n, 0.9, np.zeros((2, 3), np.float32), np.zeros(2, np.float32))


def test_aggregation_equals_closed_form_with_reset() -> None:
    rng = np.random.default_rng(0)
    st = _state()
    masks = rng.random((4, 50)) < 0.6
    agg = MaskAggregator(st, round_=1, reset_every=1, weighted=False)
    for m in masks:
        agg.add(m)
    a, b = agg.finish()
    c = masks.sum(0)
    np.testing.assert_array_equal(a, 1 + c)
    np.testing.assert_array_equal(b, 1 + 4 - c)
    th = posterior(a, b, "mean", 0.01)
    np.testing.assert_allclose(th, np.clip((1 + c) / 6, 0.01, 0.99), rtol=1e-6)
    np.testing.assert_array_equal(th, theta_from_counts(c, 4, "mean", 0.01))
    np.testing.assert_array_equal(posterior(a, b, "mode", 0.01), theta_from_counts(c, 4, "mode", 0.01))
    assert agg.counts_exact


def test_no_reset_accumulates_and_weighting_normalises() -> None:
    st = _state(3)
    st.alpha[:] = [5, 1, 2]
    st.beta[:] = [1, 5, 2]
    agg = MaskAggregator(st, round_=2, reset_every=0, weighted=True)
    agg.add(np.array([1, 0, 1], bool), weight=30)
    agg.add(np.array([0, 0, 1], bool), weight=10)
    a, b = agg.finish()
    np.testing.assert_allclose(a, [5 + 1.5, 1, 2 + 2])
    np.testing.assert_allclose(b, [1 + 0.5, 5 + 2, 2])
    assert not agg.counts_exact


def test_reset_every_k_rounds() -> None:
    st = _state(2)
    st.alpha[:] = 9
    assert MaskAggregator(st, 4, reset_every=3, weighted=False).reset  # rounds 1, 4, 7, ...
    assert not MaskAggregator(st, 3, reset_every=3, weighted=False).reset


def test_fedavg_weighted() -> None:
    out = fedavg([np.ones(3), np.zeros(3)], [3, 1])
    np.testing.assert_allclose(out, 0.75)
