"""The CLI, called in-process: happy paths and user errors (one line, exit 2, no traceback)."""

import json

import pytest

from dmtest import TINY
from deltamask.app.cli import main


def _sets(**kw: object) -> list[str]:
    out = []
    for k, v in {**TINY, **kw}.items():
        out += ["--set", f"{k}={v}"]
    return out


def test_run_and_report(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), *_sets(rounds=2)]) == 0
    line = capsys.readouterr().out
    assert "final accuracy" in line and "bpp" in line
    assert (out / "summary.json").is_file()
    assert main(["report", str(out)]) == 0


def test_config_lists_every_key(capsys) -> None:
    assert main(["config"]) == 0
    text = capsys.readouterr().out
    for key in ("method", "kappa", "codec", "reset_every", "theta0"):
        assert key in text
    assert main(["config", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["key"] for r in rows} >= {"rounds", "seed"}


def _user_error(argv: list[str], capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert err.startswith("deltamask: error: ")
    assert len(err.strip().splitlines()) == 1
    return err


def test_unknown_key(capsys) -> None:
    assert "unknown config key 'roundz'" in _user_error(["run", "--set", "roundz=3"], capsys)


def test_wrong_type(capsys) -> None:
    assert "'rounds' expects int" in _user_error(["run", "--set", "rounds=lots"], capsys)


def test_missing_dataset(tmp_path, capsys) -> None:
    err = _user_error(["run", "--out", str(tmp_path), *_sets(dataset=f"npz:{tmp_path}/nope.npz")], capsys)
    assert "nope.npz" in err


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, capsys, monkeypatch) -> None:
    import deltamask.data.sources as data

    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "none")
    monkeypatch.delenv("DELTAMASK_FASHION_MNIST", raising=False)
    err = _user_error(["run", "--out", str(tmp_path), *_sets(dataset="fashion-mnist", data_dir=str(tmp_path))], capsys)
    assert "dataset-fashion-mnist" in err


def test_missing_weights_file(tmp_path, capsys) -> None:
    err = _user_error(["run", "--out", str(tmp_path), *_sets(weights=str(tmp_path / "w.pth"))], capsys)
    assert "w.pth" in err and "does not exist" in err


def test_corrupted_state_file(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), *_sets(rounds=2)]) == 0
    capsys.readouterr()
    (out / "state.safetensors").write_bytes(b"\x00garbage" * 10)
    assert "corrupted" in _user_error(["run", "--resume", str(out)], capsys)


def test_resume_without_state(tmp_path, capsys) -> None:
    assert "nothing to resume" in _user_error(["run", "--resume", str(tmp_path)], capsys)


def test_resume_refuses_changing_the_computation(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), *_sets(rounds=1)]) == 0
    capsys.readouterr()
    assert "cannot change kappa" in _user_error(["run", "--resume", str(out), "--set", "kappa=0.3"], capsys)
    assert main(["run", "--resume", str(out), "--set", "rounds=2"]) == 0


def test_bad_preset(tmp_path, capsys) -> None:
    p = tmp_path / "bad.toml"
    p.write_text("kappa = 'high'\n")
    assert "'kappa' expects float" in _user_error(["run", "--config", str(p)], capsys)


def test_predict(tmp_path, capsys) -> None:
    import numpy as np
    import torch
    from PIL import Image

    out = tmp_path / "run"
    assert main(["run", "--out", str(out), *_sets(rounds=1)]) == 0
    img = tmp_path / "x.png"
    Image.fromarray((np.random.default_rng(0).random((8, 8)) * 255).astype("uint8")).save(img)
    capsys.readouterr()
    torch.manual_seed(0)
    assert main(["predict", "--model", str(out / "model.safetensors"), str(img)]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["image"] == str(img) and 0 <= rec["class"] < 10
    assert "does not exist" in _user_error(["predict", "--model", str(tmp_path / "none.safetensors"), str(img)], capsys)


def test_bpp_plot_total_is_uplink_plus_downlink_per_round() -> None:
    from deltamask.run.report import total_bpp

    recs = [
        {"round": 1, "uplink_bpp": 0.5, "downlink_bpp": 0.25},
        {"round": 2, "uplink_bpp": None, "downlink_bpp": 0.1},  # a skipped round records no uplink
        {"round": 3, "uplink_bpp": 0.04, "downlink_bpp": 0.17},
    ]
    assert total_bpp(recs) == [(1, 0.75), (3, pytest.approx(0.21))]
