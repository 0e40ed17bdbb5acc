"""A Flower run config is another party's input (issue 22): its ``out-dir`` must lie below the server-side
output root, after symlinks and ``..`` are resolved, so that it cannot write, or ``overwrite`` delete,
anywhere else on the server."""

from __future__ import annotations

import pytest

from deltamask.config import ConfigError
from deltamask.engines.flower.settings import FlowerSettings, out_dir_of, out_root


def s(out: str) -> FlowerSettings:
    return FlowerSettings(out_dir=out)


def test_inside_the_root_is_accepted_at_the_edge(tmp_path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    assert out_dir_of(s(str(root / "run-1")), 1, root) == root / "run-1"
    assert out_dir_of(s(str(root / "a" / "b")), 1, root) == root / "a" / "b"
    assert out_dir_of(s(str(root)), 1, root) == root  # the root itself
    assert out_dir_of(s(""), 7, root) == root / "flower-7"  # the default folder


@pytest.mark.parametrize("where", ["sibling", "parent", "dotdot", "prefix", "etc"])
def test_outside_the_root_is_refused(tmp_path, where) -> None:
    root = tmp_path / "root"
    root.mkdir()
    out = {"sibling": tmp_path / "other", "parent": tmp_path, "dotdot": root / ".." / "escape",
           "prefix": tmp_path / "root-evil", "etc": "/etc/deltamask"}[where]
    with pytest.raises(ConfigError, match=r"is outside the server's output root .*DELTAMASK_OUT_ROOT"):
        out_dir_of(s(str(out)), 1, root)


def test_a_symlink_inside_the_root_pointing_out_is_refused(tmp_path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "victim").mkdir()
    (root / "link").symlink_to(tmp_path / "victim")
    with pytest.raises(ConfigError, match=r"resolved: .*victim/run\) is outside"):
        out_dir_of(s(str(root / "link" / "run")), 1, root)


def test_a_relative_out_dir_is_refused(tmp_path) -> None:
    with pytest.raises(ConfigError, match="is relative"):
        out_dir_of(s("runs/x"), 1, tmp_path)


def test_the_root_comes_from_the_environment(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DELTAMASK_OUT_ROOT", str(tmp_path / "r"))
    assert out_root() == tmp_path / "r"
    monkeypatch.setenv("DELTAMASK_OUT_ROOT", "runs")
    with pytest.raises(ConfigError, match="DELTAMASK_OUT_ROOT='runs' is relative"):
        out_root()
    monkeypatch.delenv("DELTAMASK_OUT_ROOT")
    assert out_root().name == "deltamask-runs"


def test_a_cache_dir_outside_the_root_is_refused_on_the_server(tmp_path, monkeypatch) -> None:
    from dmtest import TINY
    from deltamask.engines.flower import make_client_app, run_server
    from flower_loopback import LoopbackGrid

    root = tmp_path / "root"
    monkeypatch.setenv("DELTAMASK_OUT_ROOT", str(root))
    defaults = {**TINY, "rounds": 1, "out-dir": str(root / "run"), "cache-dir": str(tmp_path / "elsewhere"), "prefix-cache": "disk"}
    with pytest.raises(ConfigError, match="'cache-dir' = .* is outside the server's output root"):
        run_server(LoopbackGrid(make_client_app(defaults), 3), {}, defaults)
    assert not (tmp_path / "elsewhere").exists() and not (root / "run").exists()


def test_a_run_config_writing_outside_the_root_fails_before_writing(tmp_path, monkeypatch) -> None:
    from dmtest import TINY
    from deltamask.engines.flower import make_client_app, run_server
    from flower_loopback import LoopbackGrid

    monkeypatch.setenv("DELTAMASK_OUT_ROOT", str(tmp_path / "root"))
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "metrics.jsonl").write_text("precious")
    defaults = {**TINY, "rounds": 1, "out-dir": str(victim), "overwrite": True}
    with pytest.raises(ConfigError, match="outside the server's output root"):
        run_server(LoopbackGrid(make_client_app(defaults), 3), {}, defaults)
    assert (victim / "metrics.jsonl").read_text() == "precious"
