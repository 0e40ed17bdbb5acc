"""Flower glue without a federation: records packing, client cache, run_config -> Config, the app's pyproject."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict  # noqa: E402

from deltamask.config import Config, ConfigError, from_sources  # noqa: E402
from deltamask.engines.flower import records  # noqa: E402
from deltamask.engines.flower.settings import FLOWER_KEYS, app_config_table, config_hash, resolve  # noqa: E402

pytestmark = pytest.mark.flower
EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "flower"


def _bundle(n: int) -> bytes:
    from deltamask.codecs import get_codec

    return get_codec("f32", kind="array").encode(np.arange(n, dtype=np.float32).reshape(1, n))


@pytest.mark.parametrize("n", [4, 20_000])
def test_payload_roundtrip_small_and_large(n: int) -> None:
    payload = _bundle(n)
    content = records.pack_payload(payload, {"round": 3})
    rec = content[records.PAYLOAD_KEY]
    if len(payload) < records.SMALL_PAYLOAD_BYTES:
        assert isinstance(rec, ConfigRecord)
    else:
        assert isinstance(rec, ArrayRecord)
        arr = rec["payload"]
        assert arr.stype == "deltamask/f32/v1" and arr.dtype == "uint8" and arr.shape == (len(payload),)
    assert records.unpack_payload(content) == payload
    assert records.unpack_meta(content) == {"round": 3}
    assert records.record_bytes(content) >= len(payload)


def test_empty_payload_travels() -> None:
    content = records.pack_payload(b"", {"round": 2, "client-id": 1})
    assert records.unpack_payload(content) == b""
    # a client already up to date gets an empty downlink: counting it must not crash the server
    # (Flower's count_bytes raises on b""); it counts the keys and the 8-byte scalars
    assert records.record_bytes(content) == len("payload") + len("round") + 8 + len("client-id") + 8


@pytest.mark.parametrize(
    "content, match",
    [
        (RecordDict(), "no 'deltamask.payload'"),
        (RecordDict({records.PAYLOAD_KEY: ConfigRecord({"payload": "text"})}), "no bytes"),
        (RecordDict({records.PAYLOAD_KEY: ArrayRecord({"payload": Array(np.zeros(3))})}), "stype"),
        (RecordDict({records.PAYLOAD_KEY: ArrayRecord({"payload": Array("uint8", (9,), "deltamask/x/v1", b"abc")})}), "claims"),
    ],
)
def test_malformed_records_raise(content: RecordDict, match: str) -> None:
    with pytest.raises(records.RecordError, match=match):
        records.unpack_payload(content)


def test_client_cache_roundtrip_through_context_state() -> None:
    state = RecordDict()
    assert records.load_client_state(state) == {}
    cache = {"theta": np.linspace(0, 1, 7, dtype=np.float32), "head_weight": np.ones((2, 3), np.float32), "theta_seq": 4}
    records.save_client_state(state, cache)
    back = records.load_client_state(state)
    assert back.keys() == cache.keys() and back["theta_seq"] == 4
    np.testing.assert_array_equal(back["theta"], cache["theta"])
    assert back["theta"].dtype == np.float32
    records.clear_client_state(state)
    assert records.load_client_state(state) == {}


def test_run_config_resolves_like_deltamask_run() -> None:
    cfg, st = resolve({"num-clients": 4, "clients-per-round": "2", "head_lr": 0.5, "out-dir": "/x", "round-timeout": 7})
    assert cfg.num_clients == 4 and cfg.clients_per_round == 2 and cfg.head_lr == 0.5
    assert st.out_dir == "/x" and st.round_timeout == 7.0
    with pytest.raises(ConfigError, match="unknown config key 'num-client'"):
        resolve({"num-client": 3})
    with pytest.raises(ConfigError, match="rounds"):
        resolve({"rounds": "many"})
    assert config_hash(cfg) == config_hash(cfg.replace(progress=False, device="cpu"))
    assert config_hash(cfg) != config_hash(cfg.replace(seed=1))


def test_app_pyproject_lists_every_key_with_its_default() -> None:
    data = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())
    app = data["tool"]["flwr"]["app"]
    assert app["components"] == {
        "serverapp": "deltamask.engines.flower.server_app:app",
        "clientapp": "deltamask.engines.flower.client_app:app",
    }
    assert app["config"] == app_config_table()
    cfg, _ = resolve(app["config"])
    assert cfg == Config()
    assert set(FLOWER_KEYS) <= set(app["config"])


def test_one_preset_for_both_engines() -> None:
    """A kebab-case preset is a valid `flwr run --run-config` file and a valid `deltamask run --config`."""
    preset = EXAMPLE / "tiny.toml"
    table = app_config_table()
    keys = tomllib.loads(preset.read_text())
    assert set(keys) <= set(table), "flwr rejects override keys missing from [tool.flwr.app.config]"
    flower_cfg, _ = resolve({**table, **keys})
    assert flower_cfg == from_sources(str(preset))


def test_cli_run_config_converts_a_snake_case_preset(tmp_path, capsys) -> None:
    import argparse

    from deltamask.engines.flower.cli import add_flower_parser

    preset = tmp_path / "p.toml"
    preset.write_text('num_clients = 4\nclients_per_round = 2\nmethod = "fedpm"\n')
    parser = argparse.ArgumentParser()
    add_flower_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["flower", "run-config", "--config", str(preset), "--set", "rounds=7", "--out", "/abs/out"])
    assert args.func(args) == 0
    table = tomllib.loads(capsys.readouterr().out)
    assert set(table) <= set(app_config_table())
    cfg, st = resolve(table)
    assert cfg == from_sources(str(preset), ["rounds=7"]) and st.out_dir == "/abs/out"


def test_check_config_names_an_unknown_key(tmp_path, capsys) -> None:
    from deltamask.app.cli import main

    good = tmp_path / "good.toml"
    good.write_text(f'rounds = 3\nnum-clients = 2\nclients-per-round = 2\nout-dir = "{tmp_path / "o"}"\nresume = false\n')
    assert main(["flower", "check-config", str(good)]) == 0
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = 3\nnum-clientz = 2\n")
    assert main(["flower", "check-config", str(bad)]) == 2
    assert "num-clientz" in capsys.readouterr().err
    rel = tmp_path / "rel.toml"
    rel.write_text('out-dir = "runs/x"\n')
    assert main(["flower", "check-config", str(rel)]) == 2
    assert "absolute" in capsys.readouterr().err


def _deployment_commands() -> list[str]:
    """The shell commands of docs/flower.md's first code block under "## Deployment" (continuation
    lines joined)."""
    doc = (Path(__file__).resolve().parents[3] / "docs" / "flower.md").read_text()
    section = doc[doc.index("\n## Deployment"):]
    block = section[section.index("```bash\n") + len("```bash\n"):]
    block = block[: block.index("\n```")]
    return [ln.strip() for ln in block.replace("\\\n", " ").splitlines() if ln.strip() and not ln.strip().startswith("#")]


def test_docs_deployment_commands_have_the_flags_the_deploy_test_uses() -> None:
    cmds = _deployment_commands()
    link = next(c for c in cmds if "flower-superlink" in c)
    node = next(c for c in cmds if "flower-supernode" in c)
    # tests/engines/flower/test_flower_deploy.py starts exactly these (on free ports, in their own sessions)
    for flag in ("setsid", "--insecure", "--host 127.0.0.1", "--port 9093", "--database", "--disable-runtime-dependency-installation"):
        assert flag in link, (flag, link)
    for flag in ("setsid", "--insecure", "--superlink 127.0.0.1:9093", "--host 127.0.0.1", "--port $((9094 + i))",
                 "--node-config", "partition-id=$i", "num-partitions=$N", "cache-dir="):
        assert flag in node, (flag, node)
    text = "\n".join(cmds)
    assert 'address = "127.0.0.1:9093"' in text and "insecure = true" in text
    assert 'out-dir = "$PWD/' in text  # absolute, one folder per run
    assert "flwr run examples/flower deploy --run-config" in text and "flwr ls deploy --run-id" in text
    assert "kill -- -$(cat supernode$i.pid)" in text and "kill -- -$(cat superlink.pid)" in text  # a SuperNode is stopped by its process group
    assert "export DELTAMASK_OUT_ROOT=$PWD/runs" in text  # out-dir lies below the server's output root
    # the run's own pid, and only while it holds the lock (a dead run's pid may have been reused), not pkill -f
    assert "pkill" not in text and "flock -n runs/deploy-1/.deltamask.lock true || kill" in text
    doc = (Path(__file__).resolve().parents[3] / "docs" / "flower.md").read_text()
    assert 'mkdir -p "$FLWR_HOME"\ncat > "$FLWR_HOME/config.toml"' in doc  # the simulation block creates the folder it writes to
    for words in ("--listen 0.0.0.0:9092", "resume = true", "overwrite = true", "finished:failed", "finished:completed",
                  "deltamask flower simulate --resume DIR", "--overwrite", "deltamask run --resume DIR"):
        assert words in doc, words


def test_docs_secure_commands_are_the_scripts_and_the_tests() -> None:
    """docs/flower.md's secure topology: the flags it shows are the ones scripts/secure-federation.sh starts
    (which the secure deployment test runs), and it says who can reach what."""
    root = Path(__file__).resolve().parents[3]
    doc = (root / "docs" / "flower.md").read_text()
    section = doc[doc.index("### Secure deployment"):doc.index("* **Where the files go**")]
    script = (root / "scripts" / "secure-federation.sh").read_text()
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth", "--superexec-auth-secret-file",
                 "--disable-runtime-dependency-installation", "--root-certificates", "--auth-supernode-private-key",
                 "flwr supernode register", "nginx -c"):
        assert flag in section and flag in script, flag
    assert "--insecure" not in script and "--insecure" not in section.split("**The files.**")[1]
    for words in ("deltamask flower secure-files", "scripts/secure-federation.sh start", "scripts/secure-federation.sh stop",
                  "/v1/fleet/", "/v1/control/", "/v1/runtime/", "DELTAMASK_OUT_ROOT", "What the server learns about each client"):
        assert words in section, words


def test_simulate_takes_engine_keys_from_the_preset(tmp_path, monkeypatch, capsys) -> None:
    """`deltamask flower simulate --config preset.toml` uses the preset's round-timeout, out-dir and
    overwrite (a flag given on the command line wins); Ray is not started here."""
    import flwr.simulation

    import deltamask.engines.flower.server_app as server_app
    from deltamask.app.cli import main

    seen: list[dict] = []
    monkeypatch.setattr(server_app, "make_server_app", lambda defaults=None, out_root=None: seen.append(dict(defaults, root=str(out_root))))
    monkeypatch.setattr(flwr.simulation, "run_simulation", lambda *a, **kw: None)
    preset = tmp_path / "p.toml"
    preset.write_text(f'rounds = 2\nround-timeout = 42.0\nout-dir = "{tmp_path / "sim"}"\noverwrite = true\n')
    assert main(["flower", "simulate", "--config", str(preset)]) == 1  # no ServerApp ran: no summary
    assert "wrote no summary" in capsys.readouterr().err
    assert (seen[-1]["round-timeout"], seen[-1]["out-dir"], seen[-1]["overwrite"]) == (42.0, str(tmp_path / "sim"), True)
    assert seen[-1]["root"] == str(tmp_path / "sim")  # the local user's own --out is the simulated ServerApp's output root
    assert main(["flower", "simulate", "--config", str(preset), "--round-timeout", "7"]) == 1
    assert seen[-1]["round-timeout"] == 7.0
