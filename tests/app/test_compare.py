"""`deltamask compare`: a two-method suite, resume of an interrupted run, skip of finished ones."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from dmtest import TINY, tiny_config
from deltamask.app.cli import main
from deltamask.app.compare import COLUMNS, load_suite, run_suite
from deltamask.config import ConfigError
from deltamask.engines.local import run_local


def _toml(v: object) -> str:
    return json.dumps(v) if not isinstance(v, bool) else str(v).lower()


def _suite(path: Path, runs: list[dict], **base_kw: object) -> Path:
    base = {**TINY, "rounds": 2, **base_kw}
    lines = ['title = "two methods"', "[base]"] + [f"{k} = {_toml(v)}" for k, v in base.items()]
    for r in runs:
        lines += ["[[runs]]"] + [f"{k} = {_toml(v)}" for k, v in r.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


RUNS = [{"name": "probe", "method": "linear-probe"}, {"name": "sign", "method": "signsgd", "weight_lr": 0.001}]


def test_two_method_suite_with_resume_and_skip(tmp_path) -> None:
    suite = _suite(tmp_path / "suite.toml", RUNS)
    out = tmp_path / "out"
    # an interrupted run of the suite
    _, runs = load_suite(suite)
    assert runs[1][1] == tiny_config(method="signsgd", rounds=2, weight_lr=0.001)
    run_local(runs[1][1], out / "runs" / "sign", stop_after=1)
    log: list[str] = []
    rows = run_suite(suite, out, say=log.append)
    assert any("probe: ran" in m for m in log) and any("sign: resumed" in m for m in log)
    assert [r["name"] for r in rows] == ["probe", "sign"]
    assert all(r["rounds"] == 2 and r["final_accuracy"] is not None for r in rows)
    sign = rows[1]
    assert sign["uplink_bpp"] == pytest.approx(8 * (40 + 4 + -(-sign["num_masked_params"] // 8)) / sign["num_masked_params"])
    with open(out / "comparison.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == list(COLUMNS) and [t["name"] for t in table] == ["probe", "sign"]
    md = (out / "comparison.md").read_text()
    assert "| probe | linear-probe |" in md and "| sign | signsgd |" in md and "uplink bpp" in md
    assert (out / "comparison.png").stat().st_size > 0
    assert (out / "comparison-total.png").stat().st_size > 0  # accuracy against up + down bits
    for r in rows:  # bytes per client-round, recomputed from the run's own records
        recs = [json.loads(line) for line in (out / "runs" / r["name"] / "metrics.jsonl").read_text().splitlines()]
        bits = sum(x["uplink_bits"] + x["downlink_bits"] for x in recs)
        assert r["total_bytes"] * 8 == bits
        assert r["total_bytes_per_client_round"] == pytest.approx(bits / 8 / sum(len(x["selected"]) for x in recs))
    assert "bytes per client-round (up+down)" in md
    # a second pass skips everything; the CLI prints the table
    log.clear()
    assert run_suite(suite, out, say=log.append) == rows
    assert sum("finished earlier, skipped" in m for m in log) == 2
    assert main(["compare", "--suite", str(suite), "--out", str(out), "--only", "sign"]) == 0
    # a changed config of a finished run is an error, not a silent skip
    _suite(suite, [RUNS[0], {**RUNS[1], "weight_lr": 0.01}])
    with pytest.raises(ConfigError, match="different config"):
        run_suite(suite, out, say=log.append)


@pytest.mark.parametrize(
    "runs,msg",
    [
        ([{"name": "a", "method": "fedavg"}, {"name": "a", "method": "qsgd"}], "used twice"),
        ([{"method": "fedavg"}], "no name"),
        ([{"name": "a", "method": "fedavg", "no_such_key": 1}], "unknown config key"),
        ([{"name": "a/b", "method": "fedavg"}], "folder name"),
        ([], "at least one"),
    ],
)
def test_bad_suites_say_what_is_wrong(tmp_path, runs: list, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        load_suite(_suite(tmp_path / "s.toml", runs))


def test_cli_reports_missing_suite(tmp_path, capsys) -> None:
    assert main(["compare", "--suite", str(tmp_path / "none.toml"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_preset_suite_is_valid(tmp_path) -> None:
    from deltamask.codecs import available_codecs

    text = (Path(__file__).resolve().parents[2] / "configs" / "suites" / "default.toml").read_text()
    assert 'codec = "bernoulli-ans"' in text
    for codec, stand_in in (("bernoulli-ans", "bitpack"), ("fuse8", "golomb")):  # codecs of another branch
        if codec not in available_codecs():
            text = text.replace(f'codec = "{codec}"', f'codec = "{stand_in}"')
    (tmp_path / "suite.toml").write_text(text)
    title, runs = load_suite(tmp_path / "suite.toml")
    methods = {c.method for _, c in runs}
    assert {"deltamask", "fedpm", "linear-probe", "fedavg", "qsgd", "signsgd", "topk", "drive", "eden", "lora"} <= methods
    assert len({(c.dataset, c.model, c.rounds, c.seed, c.train_samples, c.num_clients) for _, c in runs}) == 1  # one setup


def test_seeds_repeat_every_run_and_the_table_gives_mean_and_sd(tmp_path) -> None:
    """seeds = [..]: NAME-sSEED runs (seed outermost), per-seed rows, and a mean ± sd table whose
    numbers are recomputed here from the per-seed rows."""
    import statistics

    suite = _suite(tmp_path / "suite.toml", [{"name": "probe", "method": "linear-probe"}])
    text = suite.read_text().replace("[base]", "seeds = [0, 3, 5]\n[base]")
    text = "\n".join(line for line in text.splitlines() if not line.startswith("seed ="))
    suite.write_text(text + "\n")
    _, runs = load_suite(suite)
    assert [(n, c.seed) for n, c in runs] == [("probe-s0", 0), ("probe-s3", 3), ("probe-s5", 5)]
    rows = run_suite(suite, tmp_path / "out", say=lambda m: None)
    accs = [r["final_accuracy"] for r in rows]
    assert [r["seed"] for r in rows] == [0, 3, 5] and len(set(accs)) > 1  # seeds really differ
    md = (tmp_path / "out" / "comparison.md").read_text()
    want = f"| probe | linear-probe | 3 | {statistics.mean(accs):.4f} ± {statistics.stdev(accs):.4f} |"
    assert want in md, md
    for r in rows:
        assert r["total_bpp"] == pytest.approx(r["uplink_bpp_all_rounds"] + r["downlink_bpp"])


@pytest.mark.parametrize(
    "seeds,extra,msg",
    [("[0, 0]", {}, "distinct"), ("[]", {}, "distinct"), ('["a"]', {}, "distinct"), ("[0, 1]", {"seed": 4}, "drop one")],
)
def test_bad_seeds_say_what_is_wrong(tmp_path, seeds: str, extra: dict, msg: str) -> None:
    suite = _suite(tmp_path / "s.toml", [{"name": "a", "method": "fedavg", **extra}])
    text = "\n".join(line for line in suite.read_text().splitlines() if not (line.startswith("seed =") and not extra))
    suite.write_text(text.replace("[base]", f"seeds = {seeds}\n[base]") + "\n")
    with pytest.raises(ConfigError, match=msg):
        load_suite(suite)


def test_dinov2_suite_is_valid() -> None:
    title, runs = load_suite(Path(__file__).resolve().parents[2] / "configs" / "suites" / "dinov2-fmnist.toml")
    assert {c.method for _, c in runs} >= {"deltamask", "fedpm", "fedavg", "lora", "linear-probe"}
    assert sorted({c.seed for _, c in runs}) == [0, 1, 2] and len(runs) == 18
    assert len({(c.dataset, c.model, c.rounds, c.train_samples, c.image_size, c.masked_blocks) for _, c in runs}) == 1


def test_a_run_saved_before_a_config_key_existed_is_still_the_same_run(tmp_path) -> None:
    """Adding a config key (at its default) must not orphan finished runs; a non-default value must."""
    from deltamask.app.compare import _same_config

    cfg = tiny_config(rounds=2)
    saved = json.loads(json.dumps(cfg.to_dict()))
    del saved["cache_dtype"]  # written by a version that did not know the key
    assert _same_config(saved, cfg)
    assert not _same_config(saved, tiny_config(rounds=2, cache_dtype="float16"))
    assert not _same_config({**saved, "rounds": 3}, cfg)
    # a run from before the downlink key sent snapshots: it is not a run of the new default downlink=auto
    del saved["downlink"]
    assert not _same_config(saved, cfg)
    assert _same_config(saved, tiny_config(rounds=2, downlink="snapshot"))
