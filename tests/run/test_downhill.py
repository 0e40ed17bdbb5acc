"""Issue 25 item 4: a run that walks downhill says so (round records, summary.json, status line)."""

from __future__ import annotations

import json

import pytest

from deltamask.run.metrics import downhill_report, falling_streak
from deltamask.run.round import describe_downhill


def _recs(accs: list[float | None]) -> list[dict]:
    return [{"round": i + 1, "accuracy": a} for i, a in enumerate(accs)]


def _slow_streak(accs: list[float | None], k: int, drop: float) -> dict | None:
    """Reference: the longest run of strict decreases ending at the last evaluation, by brute force."""
    ev = [(i + 1, a) for i, a in enumerate(accs) if a is not None]
    best = None
    for start in range(len(ev) - 1):
        seg = ev[start:]
        if all(seg[j + 1][1] < seg[j][1] for j in range(len(seg) - 1)):
            best = seg
            break
    if best is None or len(best) - 1 < k or best[0][1] - best[-1][1] < drop:
        return None
    return {"from_round": best[0][0], "to_round": best[-1][0], "rounds": len(best) - 1}


def test_a_constructed_fall_fires_with_its_rounds_and_size() -> None:
    # the seed 5: 0.640 at the end of the warm-up, then lower every round
    accs = [0.30, 0.55, 0.640, 0.570, 0.540, 0.517, 0.493, 0.470]
    f = falling_streak(_recs(accs), 3, 0.02)
    assert f == {"from_round": 3, "to_round": 8, "rounds": 5, "from_accuracy": 0.640, "to_accuracy": 0.470,
                 "fall": pytest.approx(0.170)}
    rep = downhill_report(_recs(accs), 3, 0.02)
    assert rep["falls"] == [f]
    assert rep["below_best"] == {"best_round": 3, "best_accuracy": 0.640, "final_round": 8, "final_accuracy": 0.470,
                                 "gap": pytest.approx(0.170)}
    assert "0.6400 -> 0.4700 over rounds 3-8" in describe_downhill(rep)


def test_flat_and_rising_trajectories_stay_silent() -> None:
    flat = [0.70, 0.701, 0.699, 0.700, 0.702, 0.700, 0.701]
    noisy_down = [0.70, 0.699, 0.698, 0.697, 0.696]  # four decreases, 0.4 points in all: below the bar
    rising = [0.3, 0.5, 0.6, 0.65, 0.7]
    for accs in (flat, noisy_down, rising):
        assert falling_streak(_recs(accs), 3, 0.02) is None
        assert downhill_report(_recs(accs), 3, 0.02) is None


def test_the_edges_of_both_bounds() -> None:
    # exactly 3 decreases of exactly 2 points in all fires; 2 decreases, or 1.99 points, does not
    assert falling_streak(_recs([0.4, 0.50, 0.49, 0.485, 0.48]), 3, 0.02)["rounds"] == 3
    assert falling_streak(_recs([0.4, 0.50, 0.49, 0.485, 0.4801]), 3, 0.02) is None
    assert falling_streak(_recs([0.50, 0.40, 0.30]), 3, 0.02) is None
    assert falling_streak(_recs([0.50, 0.40, 0.30]), 2, 0.02)["rounds"] == 2
    assert falling_streak(_recs([0.5, 0.4, 0.3, 0.2]), 0, 0.0) is None  # 0 = off
    assert downhill_report(_recs([0.5, 0.4, 0.3, 0.2]), 0, 0.0) is None
    # an equal accuracy breaks the streak (not a fall)
    assert falling_streak(_recs([0.6, 0.5, 0.5, 0.4, 0.3]), 3, 0.02) is None
    # below the best without a streak: the final is 3 points under an early best
    rep = downhill_report(_recs([0.7, 0.8, 0.75, 0.78, 0.77]), 3, 0.02)
    assert rep == {"below_best": {"best_round": 2, "best_accuracy": 0.8, "final_round": 5, "final_accuracy": 0.77,
                                  "gap": pytest.approx(0.03)}}
    assert downhill_report(_recs([0.7, 0.8, 0.75, 0.78, 0.781]), 3, 0.02) is None  # 1.9 points under


def test_unevaluated_rounds_are_skipped_and_streaks_listed_once() -> None:
    accs = [0.6, None, 0.5, None, 0.4, 0.3, 0.8, 0.7, 0.6, 0.5, 0.55]
    rep = downhill_report(_recs(accs), 3, 0.02)
    assert rep["falls"] == [
        {"from_round": 1, "to_round": 6, "rounds": 3, "from_accuracy": 0.6, "to_accuracy": 0.3, "fall": pytest.approx(0.3)},
        {"from_round": 7, "to_round": 10, "rounds": 3, "from_accuracy": 0.8, "to_accuracy": 0.5, "fall": pytest.approx(0.3)},
    ]
    assert rep["below_best"]["best_round"] == 7


@pytest.mark.parametrize("seed", range(40))
def test_streak_matches_a_brute_force_reference(seed: int) -> None:
    import random

    rng = random.Random(seed)
    accs = [rng.choice([None, *[round(rng.random(), 2) for _ in range(4)]]) for _ in range(rng.randint(1, 12))]
    want = _slow_streak(accs, 2, 0.05)
    got = falling_streak(_recs(accs), 2, 0.05)
    assert (got is None) == (want is None), accs
    if got:
        assert {k: got[k] for k in want} == want


def test_a_run_records_the_fall_in_its_round_records_and_summary(tiny_cfg, tmp_path, monkeypatch, capsys) -> None:
    """The driver wires it: a run whose evaluations fall (forced by a scripted evaluation) records
    ``falling`` in the round lines, ``downhill`` in summary.json, and says it on the status line."""
    import deltamask.run.round as rnd
    from deltamask.engines.local import run_local

    accs = iter([0.50, 0.60, 0.55, 0.50, 0.45])
    real = rnd.evaluate_global

    def scripted(exp, state, r):  # type: ignore[no-untyped-def]
        ev = real(exp, state, r)
        ev["accuracy"] = next(accs)
        return ev

    monkeypatch.setattr(rnd, "evaluate_global", scripted)
    cfg = tiny_cfg.replace(rounds=5, progress=True)
    summary = run_local(cfg, tmp_path / "run")
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [("falling" in r) for r in lines] == [False, False, False, False, True]
    assert lines[-1]["falling"]["from_round"] == 2 and lines[-1]["falling"]["rounds"] == 3
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["downhill"]["falls"][0]["to_round"] == 5
    assert on_disk["downhill"]["below_best"]["gap"] == pytest.approx(0.15)
    assert summary["status"] == "completed"
    assert "FALLING 3 rounds (0.6000 -> 0.4500)" in capsys.readouterr().err
    # a steady run says nothing
    accs = iter([0.50, 0.60, 0.61, 0.62, 0.62])
    summary = run_local(cfg, tmp_path / "steady")
    assert summary["downhill"] is None


@pytest.mark.parametrize("keys", [dict(downhill_rounds=-1), dict(downhill_drop=-0.01), dict(downhill_drop=1.01)])
def test_downhill_keys_out_of_range_are_refused(keys) -> None:
    from deltamask.config import ConfigError
    from dmtest import tiny_config

    with pytest.raises(ConfigError, match=next(iter(keys))):
        tiny_config(**keys)


def test_downhill_keys_at_their_edges_are_accepted() -> None:
    from dmtest import tiny_config

    tiny_config(downhill_rounds=0, downhill_drop=0.0)
    tiny_config(downhill_rounds=1, downhill_drop=1.0)
