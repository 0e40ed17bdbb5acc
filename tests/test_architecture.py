"""docs/architecture.md's worked examples run, and do what the page says (one test per extension point)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "extend"


def _example(name: str):  # type: ignore[no-untyped-def]
    """Import examples/extend/NAME.py once (it registers its plug-in on import)."""
    mod = sys.modules.get(f"dm_example_{name}")
    if mod is None:
        spec = importlib.util.spec_from_file_location(f"dm_example_{name}", EXAMPLES / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[spec.name] = mod  # type: ignore[union-attr]
        spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def test_the_page_names_every_example_and_every_example_is_on_the_page() -> None:
    page = (ROOT / "docs" / "architecture.md").read_text()
    for f in sorted(EXAMPLES.glob("*.py")):
        assert f"examples/extend/{f.name}" in page, f.name


def test_add_a_model_family(tmp_path) -> None:
    ex = _example("add_model_family")
    from deltamask.model.backbones import family_of, load_model

    assert family_of("tinycnn:16") == (ex.TINYCNN, "16")
    loaded = load_model("tinycnn:16", image_size=32)
    assert loaded.backbone.block_indices and len(loaded.backbone.block_indices) == 4  # the 4 members of features
    summary = ex.main(str(tmp_path / "run"))
    assert summary["status"] == "completed"
    assert summary["num_masked_params"] == 2 * 16 * 16 * 3 * 3  # the last 2 blocks' conv kernels, nothing else


#: a tiny model for the examples' runs in the test suite (the examples themselves run the real default backbone)
TINY_MODEL = {"model": "timm:test_efficientnet", "weights": "random"}


def test_add_a_codec(tmp_path) -> None:
    ex = _example("add_codec")
    from deltamask.codecs import CodecError, get_codec, log2_binomial
    from deltamask.run.metrics import read_jsonl

    codec = get_codec("elias-gamma", kind="indices")
    rng = np.random.default_rng(5)
    for n, k in [(1, 0), (1, 1), (10, 10), (1000, 1), (100_000, 700)]:
        idx = np.sort(rng.choice(n, k, replace=False))
        data = codec.encode(idx, n)
        np.testing.assert_array_equal(codec.decode(data, expect_n=n), idx)
        gaps = np.diff(idx, prepend=-1)
        assert len(data) - 40 <= (int(np.sum(2 * np.floor(np.log2(gaps)) + 1)) + 7) // 8 + 8  # Elias-gamma's length
    data = codec.encode(np.sort(rng.choice(100_000, 700, replace=False)), 100_000)
    assert len(data) * 8 > log2_binomial(100_000, 700)  # above the bound, as any exact code
    # hostile bytes behind a valid CRC (the container's check passes): the codec's own checks refuse them, with
    # a CodecError and never another exception; a payload that does decode gives indices inside [0, n)
    import struct
    import zlib

    from deltamask.codecs.container import HEADER, MAGIC, unpack

    c = unpack(data)

    def forged(n: int, count: int, payload: bytes) -> bytes:
        body = HEADER.pack(MAGIC, 1, codec.codec_id, 0, n, count, 0, len(payload)) + payload
        return body + struct.pack("<I", zlib.crc32(body))

    refused = 0
    for _ in range(300):
        payload = bytearray(c.payload)
        for _ in range(int(rng.integers(1, 4))):
            payload[rng.integers(len(payload))] ^= 1 << int(rng.integers(8))
        cut = bytes(payload[: rng.integers(len(payload) + 1)]) if rng.random() < 0.3 else bytes(payload)
        count = int(c.count + rng.integers(-3, 4)) if rng.random() < 0.3 else c.count
        try:
            got = codec.decode(forged(c.n, max(count, 0), cut), expect_n=c.n)
        except CodecError:
            refused += 1
            continue
        assert got.size == max(count, 0) and (got.size == 0 or (got.min() >= 0 and got.max() < c.n))
        assert got.size < 2 or bool(np.all(np.diff(got) > 0))
    assert refused > 100  # most corruptions are caught by the codec itself
    with pytest.raises(CodecError):
        codec.decode(forged(10, 11, b"\xff"), expect_n=10)  # more keys than the universe
    # a plug-in codec is an auto candidate: with an honest size estimate, auto still picks the smaller payload
    auto = get_codec("auto", kind="indices")
    assert "elias-gamma" in [x.name for x in auto.codecs]
    sparse = np.sort(rng.choice(2_000_000, 200, replace=False))
    chosen = auto.encode(sparse, 2_000_000)
    assert len(chosen) < len(codec.encode(sparse, 2_000_000)) and len(chosen) <= len(get_codec("golomb").encode(sparse, 2_000_000))
    summary = ex.main(str(tmp_path / "run"), **TINY_MODEL)
    assert summary["status"] == "completed"
    mask_rounds = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r.get("clients")]
    assert mask_rounds and {c["codec"] for r in mask_rounds for c in r["clients"] if "codec" in c} == {"elias-gamma"}


def test_add_a_method(tmp_path) -> None:
    ex = _example("add_method")
    from deltamask.config import METHOD_NAMES
    from deltamask.methods import ClientContext

    assert "deltamask-random" in METHOD_NAMES
    out = ex.main(str(tmp_path), **TINY_MODEL)
    assert {m: s["status"] for m, s in out.items()} == {"deltamask": "completed", "deltamask-random": "completed"}
    # what it sends: a random ceil(kappa * |delta|) of the delta, not the top-kappa
    from dmtest import tiny_config
    from deltamask.run.experiment import build_experiment

    m = build_experiment(tiny_config(method="deltamask-random", kappa=0.3)).method
    rng = np.random.default_rng(0)
    theta_g = rng.random(m.n).astype(np.float32)
    theta_k = np.clip(theta_g + rng.normal(0, 0.2, m.n), 0, 1).astype(np.float32)
    m_k = rng.random(m.n) < theta_k
    ctx = ClientContext(3, 1, 0, {})
    payload, metrics = m.encode_mask(m_k, theta_k, theta_g, ctx)
    delta = np.flatnonzero(m_k != (theta_g >= 0.5))
    sent = m.index_codec.decode(payload, expect_n=m.n)
    assert set(sent) <= set(delta) and sent.size == int(np.ceil(0.3 * delta.size)) == metrics["num_keys"]
    top, _ = type(m).__mro__[1].encode_mask(m, m_k, theta_k, theta_g, ctx)  # DeltaMask's own top-kappa
    assert not np.array_equal(m.index_codec.decode(top, expect_n=m.n), sent)
    np.testing.assert_array_equal(m.index_codec.decode(m.encode_mask(m_k, theta_k, theta_g, ctx)[0], expect_n=m.n), sent)


def test_add_a_transport(tmp_path) -> None:
    ex = _example("add_transport")
    from dmtest import tiny_config
    from deltamask.engines.local import run_local
    from deltamask.run.metrics import read_jsonl

    cfg = tiny_config(num_clients=4, clients_per_round=3, rounds=4)
    # a perfect network moves the same bytes as the local engine: the same run, record for record
    run_local(cfg, tmp_path / "local")
    ex.run_lossy(cfg, tmp_path / "lossy0", 0.0)
    keep = ("accuracy", "uplink_bytes", "downlink_bytes", "selected", "num_aggregated")
    a, b = read_jsonl(tmp_path / "local" / "metrics.jsonl"), read_jsonl(tmp_path / "lossy0" / "metrics.jsonl")
    assert [{k: r.get(k) for k in keep} for r in a] == [{k: r.get(k) for k in keep} for r in b]
    # a lossy one records every lost reply as the client's timeout, and the run goes on
    summary = ex.run_lossy(cfg, tmp_path / "lossy", 0.4)
    assert summary["status"] == "completed"
    recs = read_jsonl(tmp_path / "lossy" / "metrics.jsonl")
    lost = [(r["round"], c) for r in recs for c in r["lost_replies"]]
    assert lost and lost == [(r["round"], f["client"]) for r in recs for f in r["failures"] if f["kind"] == "timeout"]


def test_the_command_line_loads_a_plugin_and_says_when_it_cannot(tmp_path, capsys) -> None:
    from deltamask.app.cli import main

    sets = ["--set", "model=timm:test_efficientnet", "--set", "weights=random", "--set", "dataset=digits",
            "--set", "image_size=32", "--set", "rounds=2", "--set", "head_warmup_rounds=1", "--set", "num_clients=2",
            "--set", "clients_per_round=2", "--set", "train_samples=120", "--set", "test_samples=60",
            "--set", "masked_blocks=1", "--set", "progress=false"]
    rc = main(["run", "--plugin", str(EXAMPLES / "add_codec.py"), "--set", "codec=elias-gamma", "--out",
               str(tmp_path / "run"), *sets])
    assert rc == 0 and '"codec": "elias-gamma"' in (tmp_path / "run" / "metrics.jsonl").read_text()
    assert main(["run", "--plugin", str(tmp_path / "nope.py"), "--out", str(tmp_path / "r2"), *sets]) == 2
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "bad_plugin.py"
    bad.write_text("raise RuntimeError('broken on purpose')\n")
    assert main(["run", "--plugin", str(bad), "--out", str(tmp_path / "r3"), *sets]) == 2
    assert "broken on purpose" in capsys.readouterr().err
