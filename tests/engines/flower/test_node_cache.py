"""The per-node disk cache of a Flower client's round-invariant data (deltamask.engines.flower.node_cache), and
``build_experiment(..., test=False)``. Tiny config: timm:test_efficientnet, random weights, digits."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dmtest import tiny_config
from deltamask.config import Config
from deltamask.run import experiment as experiment_mod
from deltamask.engines.flower import node_cache
from deltamask.run.experiment import build_experiment
from deltamask.methods import ClientContext
from deltamask.engines.flower.node_cache import MANIFEST, TENSORS, cache_counts, cache_key, client_experiment_cached, key_material

PID = 1


@pytest.fixture(scope="module")
def cfg():
    return tiny_config(device="cpu")


@pytest.fixture(scope="module")
def ref(cfg):
    """What a client process builds today, and the torch RNG state it leaves behind."""
    exp = build_experiment(cfg, clients=[PID])
    return exp, torch.get_rng_state()


@pytest.fixture(scope="module")
def warm_dir(cfg, tmp_path_factory) -> Path:
    """A cache directory holding client PID's entry for ``cfg`` (copy it before changing it)."""
    d = tmp_path_factory.mktemp("warm")
    assert client_experiment_cached(cfg, PID, d)[2] is False
    return d


@pytest.fixture
def cache(warm_dir, tmp_path) -> Path:
    d = tmp_path / "cache"
    shutil.copytree(warm_dir, d)
    (d / node_cache.EVENTS).unlink()
    return d


def same_data(a, b) -> None:
    assert a.client_id == b.client_id
    for x, y in ((a.h, b.h), (a.y, b.y)):
        assert x.dtype == y.dtype and x.device == y.device and x.shape == y.shape
        assert torch.equal(x, y)


def entry_of(cache: Path, cfg) -> Path:
    return cache / cache_key(cfg, PID)


# --- the cached client is the built client ----------------------------------------------------------

def test_miss_then_hit_equal_what_build_experiment_gives(cfg, ref, tmp_path) -> None:
    want, want_rng = ref
    before = dict(node_cache.STATS)
    exp1, data1, hit1 = client_experiment_cached(cfg, PID, tmp_path)
    exp2, data2, hit2 = client_experiment_cached(cfg, PID, tmp_path)
    assert (hit1, hit2) == (False, True)
    assert node_cache.STATS == {"hits": before["hits"] + 1, "builds": before["builds"] + 1}
    assert torch.equal(torch.get_rng_state(), want_rng)  # same seed, same draws, before any round
    ref_data = want.client_data(PID)
    for exp, data in ((exp1, data1), (exp2, data2)):
        same_data(data, ref_data)
        same_data(exp.client_data(PID), ref_data)
        assert exp.client_sizes == want.client_sizes
        assert len(exp.partitions) == len(want.partitions)
        assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(exp.partitions, want.partitions))
        assert exp.image_size == want.image_size and exp.device == want.device
        assert exp.dataset.classes == want.dataset.classes and exp.dataset.num_classes == want.dataset.num_classes
        assert exp.method.name == want.method.name and exp.net.training == want.net.training
        sd, wsd = exp.net.state_dict(), want.net.state_dict()
        assert sd.keys() == wsd.keys() and all(torch.equal(sd[k], wsd[k]) for k in sd)
        assert exp.test_h.numel() == 0 and exp.test_y.numel() == 0
    assert cache_counts(tmp_path) == {"hit": 1, "build": 1}
    files = sorted(p.name for p in entry_of(tmp_path, cfg).iterdir())
    assert files == [MANIFEST, TENSORS]
    man = json.loads((entry_of(tmp_path, cfg) / MANIFEST).read_text())
    assert man["key"] == cache_key(cfg, PID) and set(man["tensors"]) == {"h", "y"}


def test_hit_gives_the_same_client_replies(cfg, ref, cache) -> None:
    exp, data, hit = client_experiment_cached(cfg, PID, cache)
    assert hit

    def replies(e, d) -> list[bytes]:
        state, mem = e.method.init_state(), {}
        out = []
        for rnd in (1, 2):  # a head warm-up round, then a mask round
            reply = e.method.client_update(e.method.downlink(state, PID, rnd), d, ClientContext(rnd, PID, cfg.seed, mem))
            out.append(reply.payload)
        return out

    want = build_experiment(cfg, clients=[PID])
    assert replies(exp, data) == replies(want, want.client_data(PID))


_CHILD = """
import sys, hashlib
sys.path[:0] = {paths!r}
from dmtest import tiny_config
from deltamask.config import Config
from deltamask.engines.flower.node_cache import client_experiment_cached
exp, data, hit = client_experiment_cached(tiny_config(device="cpu"), {pid}, {cache!r})
print("RESULT", hit, hashlib.sha256(data.h.numpy().tobytes() + data.y.numpy().tobytes()).hexdigest())
"""


def test_processes_racing_on_an_empty_cache_leave_one_entry_reused_later(cfg, ref, tmp_path) -> None:
    """Two client processes build at once (each starts fresh, as in a deployment); the entry they
    leave is valid and the next process hits it."""
    tests_dir = Path(__file__).resolve().parents[2]  # tests/dmtest.py
    code = _CHILD.format(paths=[str(tests_dir.parent / "src"), str(tests_dir)], pid=PID, cache=str(tmp_path))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    results = [next(line.split()[1:] for line in o[0].splitlines() if line.startswith("RESULT")) for o in outs]
    want = ref[0].client_data(PID)
    digest = hashlib.sha256(want.h.numpy().tobytes() + want.y.numpy().tobytes()).hexdigest()
    assert all(r[1] == digest for r in results)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([cache_key(cfg, PID), node_cache.EVENTS])  # no temp dirs left
    exp, data, hit = client_experiment_cached(cfg, PID, tmp_path)
    assert hit
    same_data(data, want)
    events = node_cache.cache_events(tmp_path)
    assert len({e["process"] for e in events}) == 3 and events[-1]["event"] == "hit"


# --- the key ----------------------------------------------------------------------------------------

#: every config key that changes the cached arrays, with another valid value
KEYED = {
    "model": "efficientnet_lite0",
    "weights": "",
    "dataset": "fashion-mnist",
    "data_dir": "/nonexistent",
    "image_size": 24,
    "train_samples": 200,
    "test_samples": 60,
    "seed": 1,
    "num_clients": 4,
    "partition": "iid",
    "alpha": 0.3,
    "min_partition_size": 5,
    "masked_blocks": 1,
    "mask_pattern": r"blocks\.5",
    "cache_dtype": "float16",
}


def test_the_keyed_keys_are_the_config_fields_marked_data() -> None:
    # the cache key reads the config fields' own metadata (effect="data"): this list and that one agree
    from deltamask.config import keys_with

    assert set(KEYED) == keys_with("data")
    assert node_cache.IGNORED_KEYS == frozenset(Config().to_dict()) - set(KEYED)


def _other_value(cfg, key: str):  # type: ignore[no-untyped-def]
    """Another valid value of a config key (for the keys that must not change the cache key)."""
    from deltamask.config import FIELDS

    special = {"method": "fedpm", "codec": "golomb", "downlink_codec": "probs-q8", "device": "cuda", "kappa": 0.5,
               "kappa_min": 0.5, "eps": 0.02, "theta0": 0.9, "trim_fraction": 0.1, "clients_per_round": 1,
               "min_replies": 2, "head_server_lr": {"train_head": True, "head_server_lr": 0.5}, "posterior_memory": 0.5, "max_flip_fraction": 0.5,
               "flip_outlier": 2.0, "clip_factor": 2.0, "downhill_drop": 0.05, "eden_bits": 0.25, "rotation_block": 256,
               "qsgd_levels": 8, "cache_dir": "/nonexistent", "client_loss": "ce", "kappa_schedule": "cosine",
               "tracking": "tensorboard", "tracking_dir": "/nonexistent", "tracking_experiment": "suite"}
    if key in special:
        return special[key] if isinstance(special[key], dict) else {key: special[key]}
    f = FIELDS[key]
    if f.metadata["choices"]:
        return {key: next(c for c in f.metadata["choices"] if c != getattr(cfg, key))}
    now = getattr(cfg, key)
    return {key: {bool: lambda v: not v, int: lambda v: v + 1, float: lambda v: v * 2 if v else 0.5}[type(now)](now)}


@pytest.mark.parametrize("key", sorted(set(Config().to_dict()) - set(KEYED) - {"device"}))
def test_every_key_not_marked_data_keeps_the_cache_key(cfg, key: str) -> None:
    # device enters the key resolved, as the device kind (key_material)
    other = cfg.replace(**_other_value(cfg, key))
    assert getattr(other, key) != getattr(cfg, key)
    assert cache_key(other, PID) == cache_key(cfg, PID)


@pytest.mark.parametrize("key", sorted(KEYED))
def test_every_key_that_matters_changes_the_cache_key(cfg, key: str) -> None:
    assert cache_key(cfg.replace(**{key: KEYED[key]}), PID) != cache_key(cfg, PID)


def test_partition_id_and_library_versions_change_the_cache_key(cfg, monkeypatch) -> None:
    assert cache_key(cfg, PID) != cache_key(cfg, PID + 1)
    k = cache_key(cfg, PID)
    monkeypatch.setattr(node_cache, "__version__", "999")
    assert cache_key(cfg, PID) != k
    monkeypatch.undo()
    monkeypatch.setattr(node_cache, "_version", lambda dist: "0.0.0")  # torch, timm, ... upgraded
    assert cache_key(cfg, PID) != k


@pytest.mark.parametrize("change", [dict(rounds=7), dict(progress=True), dict(lr=0.05), dict(method="fedpm", codec="auto"), dict(kappa=0.5, batch_size=16)])
def test_keys_that_do_not_matter_keep_the_key_and_hit(cfg, ref, cache, change) -> None:
    other = cfg.replace(**change)
    assert cache_key(other, PID) == cache_key(cfg, PID)
    exp, data, hit = client_experiment_cached(other, PID, cache)
    assert hit and exp.cfg == other and exp.method.name == other.method
    same_data(data, ref[0].client_data(PID))


@pytest.mark.parametrize("change", [dict(seed=1), dict(image_size=24), dict(masked_blocks=1)])
def test_a_key_that_matters_misses_rebuilds_and_then_hits(cfg, cache, change) -> None:
    other = cfg.replace(**change)
    exp, data, hit = client_experiment_cached(other, PID, cache)
    assert not hit
    same_data(data, build_experiment(other, clients=[PID]).client_data(PID))
    assert client_experiment_cached(other, PID, cache)[2]
    assert client_experiment_cached(cfg, PID, cache)[2]  # the old entry is still there
    assert cache_counts(cache, cache_key(other, PID)) == {"hit": 1, "build": 1}
    assert cache_counts(cache, cache_key(cfg, PID)) == {"hit": 1, "build": 0}


def test_local_weights_and_data_files_are_fingerprinted(tmp_path) -> None:
    w = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(3)}, str(w))
    npz = tmp_path / "d.npz"
    np.savez(npz, x=np.zeros((4, 8, 8, 3), np.uint8), y=np.zeros(4, np.int64))
    cfg = tiny_config(device="cpu", weights=str(w), dataset=f"npz:{npz}")
    k = cache_key(cfg, PID)
    assert cache_key(cfg, PID) == k
    save_file({"x": torch.zeros(4)}, str(w))  # same path, new content
    k2 = cache_key(cfg, PID)
    assert k2 != k
    np.savez(npz, x=np.zeros((5, 8, 8, 3), np.uint8), y=np.zeros(5, np.int64))
    assert cache_key(cfg, PID) != k2


def test_fashion_mnist_files_are_fingerprinted(tmp_path) -> None:
    src = Path("/usr/share/datasets/fashion-mnist")
    if not src.is_dir():
        pytest.skip("Fashion-MNIST not installed")
    for f in src.glob("*.gz"):
        os.symlink(f, tmp_path / f.name)
    cfg = tiny_config(device="cpu", dataset="fashion-mnist", data_dir=str(tmp_path))
    assert all(isinstance(f, list) and f[1] != "missing" for f in key_material(cfg, PID)["data"])
    k = cache_key(cfg, PID)
    target = tmp_path / "t10k-labels-idx1-ubyte.gz"
    target.unlink()
    shutil.copy(src / target.name, target)  # same name, another file (another mtime)
    os.utime(target, ns=(1, 1))
    assert cache_key(cfg, PID) != k


# --- verification on load ---------------------------------------------------------------------------

def _flip_last_byte(entry: Path) -> None:
    b = bytearray((entry / TENSORS).read_bytes())
    b[-1] ^= 0x5A
    (entry / TENSORS).write_bytes(bytes(b))


def _rewrite(entry: Path, fn) -> None:
    arrays = load_file(str(entry / TENSORS))
    save_file(fn(arrays), str(entry / TENSORS))


def _edit_manifest(entry: Path, fn) -> None:
    man = json.loads((entry / MANIFEST).read_text())
    fn(man)
    (entry / MANIFEST).write_text(json.dumps(man))


CORRUPTIONS = {
    "array bytes flipped": _flip_last_byte,
    "tensors truncated": lambda e: (e / TENSORS).write_bytes((e / TENSORS).read_bytes()[:100]),
    "tensors missing": lambda e: (e / TENSORS).unlink(),
    "manifest not json": lambda e: (e / MANIFEST).write_text('{"format": 1, "key'),
    "manifest missing": lambda e: (e / MANIFEST).unlink(),
    "manifest for another key": lambda e: _edit_manifest(e, lambda m: m.update(key="0" * 32)),
    "manifest for another config": lambda e: _edit_manifest(e, lambda m: m["material"]["config"].update(seed=5)),
    "same bytes, other shape": lambda e: _rewrite(e, lambda a: {**a, "h": a["h"].reshape(a["h"].shape[0], -1)}),
    "same bytes, other dtype": lambda e: _rewrite(e, lambda a: {**a, "h": a["h"].view(torch.int32)}),
    "client sizes too short": lambda e: _edit_manifest(e, lambda m: m.update(client_sizes=m["client_sizes"][:-1])),
    "client size off by one": lambda e: _edit_manifest(e, lambda m: m["client_sizes"].__setitem__(PID, m["client_sizes"][PID] + 1)),
    "model changed since": lambda e: _edit_manifest(e, lambda m: m.update(first_masked_stage=m["first_masked_stage"] + 1)),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_a_corrupted_entry_is_detected_and_rebuilt(cfg, ref, cache, caplog, kind: str) -> None:
    CORRUPTIONS[kind](entry_of(cache, cfg))
    with caplog.at_level(logging.WARNING, logger="deltamask"):
        exp, data, hit = client_experiment_cached(cfg, PID, cache)
    assert not hit
    assert any("unusable" in r.getMessage() for r in caplog.records)
    same_data(data, ref[0].client_data(PID))
    exp, data, hit = client_experiment_cached(cfg, PID, cache)  # the rebuilt entry replaced the bad one
    assert hit
    same_data(data, ref[0].client_data(PID))
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temp / trash dirs left
    assert cache_counts(cache) == {"hit": 1, "build": 1}
    assert "reason" in node_cache.cache_events(cache)[0]


def test_installing_over_a_valid_entry_keeps_it(cfg, ref, cache) -> None:
    """A second writer of the same key (a process that lost the race) leaves the entry valid."""
    entry = entry_of(cache, cfg)
    created = json.loads((entry / MANIFEST).read_text())["created"]
    want = ref[0]
    key, material = cache_key(cfg, PID), key_material(cfg, PID)
    node_cache._write_entry(cache, key, material, PID, want, want.client_data(PID))
    assert json.loads((entry / MANIFEST).read_text())["created"] == created
    assert sorted(p.name for p in cache.iterdir()) == [key]
    assert client_experiment_cached(cfg, PID, cache)[2]


def test_an_unwritable_cache_costs_only_the_speed_up(cfg, ref, tmp_path, caplog) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING, logger="deltamask"):
        exp, data, hit = client_experiment_cached(cfg, PID, blocker)
    assert not hit
    same_data(data, ref[0].client_data(PID))
    assert any("could not store" in r.getMessage() for r in caplog.records)


# --- build_experiment(test=False) -------------------------------------------------------------------

def test_test_false_skips_the_test_prefix_and_keeps_the_train_tensors(cfg, ref, monkeypatch) -> None:
    want, want_rng = ref
    seen: list[int] = []
    real = experiment_mod.prefix_outputs

    def counting(net, x, *a, **k):
        seen.append(len(x))
        return real(net, x, *a, **k)

    monkeypatch.setattr(experiment_mod, "prefix_outputs", counting)
    exp = build_experiment(cfg, clients=[PID], test=False)
    assert seen == [want.client_sizes[PID]]  # the client's images only: no test images
    assert exp.test_h.numel() == 0 and exp.test_y.numel() == 0 and exp.test_y.dtype == torch.int64
    assert want.test_h.shape[0] == want.test_y.shape[0] == cfg.test_samples  # test=True (default) still prepares them
    assert torch.equal(exp.train_h, want.train_h) and torch.equal(exp.train_y, want.train_y)
    assert all(np.array_equal(a, b) for a, b in zip(exp.partitions, want.partitions))
    assert exp.client_sizes == want.client_sizes
    assert torch.equal(torch.get_rng_state(), want_rng)
    same_data(exp.client_data(PID), want.client_data(PID))
    seen.clear()
    build_experiment(cfg, clients=[PID])
    assert seen == [want.client_sizes[PID], cfg.test_samples]


@pytest.mark.gpu
def test_cached_tensors_move_to_the_configured_device(tmp_path) -> None:
    cfg = tiny_config(device="cuda")
    assert client_experiment_cached(cfg, PID, tmp_path)[2] is False
    exp, data, hit = client_experiment_cached(cfg, PID, tmp_path)
    assert hit and data.h.is_cuda and exp.net.scores.is_cuda
    same_data(data, build_experiment(cfg, clients=[PID]).client_data(PID))
    assert load_file(str(entry_of(tmp_path, cfg) / TENSORS))["h"].device.type == "cpu"
