"""The ``deltamask codec`` CLI, called in-process through a tiny argparse parser."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from deltamask.app.bench import add_bench_parser
from deltamask.app.cli_codec import add_codec_parser


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="deltamask")
    sub = parser.add_subparsers(dest="command")
    add_codec_parser(sub)
    add_bench_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.mark.parametrize("codec", ["fuse8", "fuse16-4w", "golomb", "ans", "auto"])
def test_encode_decode_inspect(tmp_path: Path, codec: str, capsys: pytest.CaptureFixture[str]) -> None:
    idx = np.array([5, 17, 18, 900, 12345])
    np.save(tmp_path / "in.npy", idx)
    out = tmp_path / "out.bin"
    assert run(["codec", "encode", "--codec", codec, "--n", "20000", "--indices", str(tmp_path / "in.npy"),
                "-o", str(out)]) == 0
    assert run(["codec", "decode", str(out), "-o", str(tmp_path / "dec.npy")]) == 0
    dec = np.load(tmp_path / "dec.npy")
    assert np.isin(idx, dec).all()
    assert run(["codec", "decode", str(out), "-o", str(tmp_path / "x.npy"), "--expect-n", "20000"]) == 0
    capsys.readouterr()
    assert run(["codec", "decode", str(out), "-o", str(tmp_path / "x.npy"), "--expect-n", "19999"]) != 0
    assert "receiver expects n=19999" in capsys.readouterr().err
    assert run(["codec", "decode", str(out), "-o", str(tmp_path / "x.npy"), "--max-n", "10000"]) != 0
    assert "above --max-n 10000" in capsys.readouterr().err
    png = tmp_path / "f.png"
    argv = ["codec", "inspect", str(out)] + (["--png", str(png)] if codec.startswith("fuse") else [])
    assert run(argv) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["count"] == 5 and info["n"] == 20000 and info["bits_per_key"] > 0 and info["bound_bits"] > 0
    if codec.startswith("fuse"):
        assert png.exists() and info["png_bytes"] == png.stat().st_size
        assert run(["codec", "decode", str(png), "-o", str(tmp_path / "dec2.npy")]) == 0
        assert np.array_equal(np.load(tmp_path / "dec2.npy"), dec)
    else:
        assert np.array_equal(dec, idx)


def test_bad_inputs_exit_nonzero_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    idx = np.arange(0, 1000, 7)
    np.save(tmp_path / "in.npy", idx)
    good = tmp_path / "good.bin"
    assert run(["codec", "encode", "--codec", "golomb", "--n", "1000", "--indices", str(tmp_path / "in.npy"),
                "-o", str(good)]) == 0
    data = good.read_bytes()
    corrupt = bytearray(data)
    corrupt[50] ^= 0xFF
    big = bytearray(data)
    big[16:24] = (10**12).to_bytes(8, "little")  # count field claims 10^12 keys
    cases = {"trunc.bin": data[:30], "short.bin": data[:-3], "corrupt.bin": bytes(corrupt), "big.bin": bytes(big),
             "junk.bin": b"hello world, not a payload at all"}
    for fname, blob in cases.items():
        (tmp_path / fname).write_bytes(blob)
        for cmd in (["decode", str(tmp_path / fname), "-o", str(tmp_path / "x.npy")],
                    ["inspect", str(tmp_path / fname)]):
            capsys.readouterr()
            assert run(["codec", *cmd]) != 0
            err = capsys.readouterr().err.strip()
            assert err and "\n" not in err and "Traceback" not in err, err
    capsys.readouterr()
    assert run(["codec", "decode", str(tmp_path / "missing.bin"), "-o", str(tmp_path / "x.npy")]) == 1
    assert run(["codec", "encode", "--codec", "nope", "--n", "10", "--indices", str(tmp_path / "in.npy"),
                "-o", str(tmp_path / "x.bin")]) == 1
    assert "valid:" in capsys.readouterr().err
    np.save(tmp_path / "oob.npy", np.array([5000]))
    assert run(["codec", "encode", "--codec", "ans", "--n", "10", "--indices", str(tmp_path / "oob.npy"),
                "-o", str(tmp_path / "x.bin")]) == 1
    (tmp_path / "bad.npy").write_bytes(b"nope")
    assert run(["codec", "encode", "--codec", "ans", "--n", "10", "--indices", str(tmp_path / "bad.npy"),
                "-o", str(tmp_path / "x.bin")]) == 1
    assert run(["codec"]) == 2
    assert run(["codec", "list"]) == 0


def test_bench_smoke(tmp_path: Path) -> None:
    """The benchmark runs end to end on a tiny universe (the real run is a script, not a test)."""
    assert run(["bench", "codecs", "--out", str(tmp_path), "--n", "50000", "--fractions", "0.02",
                "--repeats", "1"]) == 0
    res = json.loads((tmp_path / "codecs.json").read_text())
    assert {r["codec"] for r in res["rows"]} >= {"fuse8", "golomb", "ans"}
    assert all(r["false_negatives"] == 0 for r in res["rows"])
    assert "| k/N |" in (tmp_path / "codecs.md").read_text()
