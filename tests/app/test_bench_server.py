"""``deltamask bench server`` runs end to end at a small size and checks what it measures (no timings asserted)."""

from __future__ import annotations

import json

from deltamask.app.bench import main


def test_bench_server_small(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rc = main(["server", "--out", str(tmp_path), "--sizes", "300000", "--clients", "2,3", "--densities", "0.01",
               "--reference", "300000:3:0.01"])
    assert rc == 0
    res = json.loads((tmp_path / "server.json").read_text())
    assert [r["clients"] for r in res["rows"]] == [2, 3] and not any("error" in r for r in res["rows"])
    for r in res["rows"]:
        assert r["downlink_roundtrip_identical"] and r["downlink_codec"] == "probs-counts-rans"
        assert r["floor_s"] > 0 and r["decode_aggregate_s_per_client"] > 0 and r["server_peak_bytes"] > 0
        assert abs(r["keys_per_client"] - 3000) < 300
    assert res["reference"][0]["theta_identical_to_sparse"] is True
    md = (tmp_path / "server.md").read_text()
    assert "dense (before)" in md and "sparse (now)" in md


def test_bench_server_refuses_bad_arguments(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["server", "--out", str(tmp_path), "--sizes", "1000", "--densities", "0"]) == 2
    assert "densities" in capsys.readouterr().err
