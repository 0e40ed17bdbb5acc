"""Bounded memory (issue 11, item 4): the prefix cache's dtype, RAM budget and disk store, and streamed
folder: / hf: images. Every non-default setting is pinned against the default float32 in-RAM cache."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from dmtest import tiny_config
from deltamask.app import cli
from deltamask.model import prefix_cache
from deltamask.config import ConfigError, build_config
from deltamask.data import ImageSource, load_dataset, subsample
from deltamask.engines.local import run_local
from deltamask.run.experiment import build_experiment
from deltamask.methods import ClientContext
from deltamask.engines.flower.node_cache import client_experiment_cached
from deltamask.model.prefix_cache import DiskRows, DiskStore

PID = 1


@pytest.fixture(scope="module")
def cfg():
    return tiny_config(device="cpu")


@pytest.fixture(scope="module")
def ref(cfg):
    """The straightforward reference: float32 prefix outputs in RAM (the default)."""
    return build_experiment(cfg)


def _replies(exp, data, cfg) -> list[bytes]:
    state, mem, out = exp.method.init_state(), {}, []
    for rnd in (1, 2):  # a head warm-up round (features of every row), then a mask round (shuffled batches)
        out.append(exp.method.client_update(exp.method.downlink(state, data.client_id, rnd), data, ClientContext(rnd, data.client_id, cfg.seed, mem)).payload)
    return out


def _strip_times(path: Path) -> list[dict]:
    def clean(o):  # noqa: ANN001, ANN202
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items() if "second" not in k and "time" not in k}
        if isinstance(o, list):
            return [clean(v) for v in o]
        return o

    return [clean(json.loads(line)) for line in path.read_text().splitlines()]


# --- the disk store ---------------------------------------------------------------------------------

def test_disk_store_holds_the_same_rows_in_a_file_of_the_right_size(cfg, ref, tmp_path) -> None:
    exp = build_experiment(cfg.replace(prefix_cache="disk", cache_dir=str(tmp_path)))
    assert exp.cache_where == "disk" and ref.cache_where == "ram"
    assert isinstance(exp.train_h, DiskRows) and isinstance(exp.test_h, DiskRows)
    files = sorted(tmp_path.glob("deltamask-prefix-*.bin"))
    assert len(files) == 2  # train and test
    for h, want in ((exp.train_h, ref.train_h), (exp.test_h, ref.test_h)):
        assert h.store.path in files
        assert h.store.path.stat().st_size == want.numel() * 4 == len(h) * h.store.row_bytes
        assert h.shape == want.shape and torch.equal(h[:], want)
    perm = torch.randperm(len(ref.train_h), generator=torch.Generator().manual_seed(0))[:50]
    assert torch.equal(exp.train_h[perm], ref.train_h[perm])  # shuffled gathers, any order
    a, b = exp.client_data(PID), ref.client_data(PID)
    assert isinstance(a.h, DiskRows) and torch.equal(a.h[:], b.h) and torch.equal(a.y, b.y)
    assert _replies(exp, a, cfg) == _replies(ref, b, cfg)
    exp.train_h.store.close()
    assert not exp.train_h.store.path.exists()


def test_tiny_ram_budget_runs_on_disk_bit_identical_to_the_ram_run(tmp_path) -> None:
    base = tiny_config(rounds=3, progress=False)
    run_local(base, tmp_path / "ram")
    run_local(base.replace(cache_ram_mb=1, cache_dir=str(tmp_path / "cache")), tmp_path / "disk")  # 1 MB < the cache
    assert json.loads((tmp_path / "disk" / "summary.json").read_text())["prefix_cache"] == "disk"
    assert json.loads((tmp_path / "ram" / "summary.json").read_text())["prefix_cache"] == "ram"
    assert _strip_times(tmp_path / "disk" / "metrics.jsonl") == _strip_times(tmp_path / "ram" / "metrics.jsonl")


def test_reading_the_disk_store_keeps_traced_memory_to_a_few_batches(tmp_path) -> None:
    n, row = 2000, (16, 32)
    store = DiskStore(tmp_path, n, row, torch.float32, "t")
    for i in range(0, n, 500):
        store.append(torch.arange(i, i + 500, dtype=torch.float32)[:, None, None].expand(500, *row))
    total = n * store.row_bytes  # 4 MB
    rows = DiskRows(store).select(np.arange(0, n, 2))
    tracemalloc.start()
    try:
        for idx in torch.randperm(len(rows), generator=torch.Generator().manual_seed(1)).split(32):
            got = rows[idx]
            assert torch.equal(got[:, 0, 0], (2 * idx).to(torch.float32))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 32 * store.row_bytes < total / 4, (peak, total)


# --- dtype ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_dtypes_halve_the_bytes_and_keep_accuracy_close(cfg, ref, dtype) -> None:
    from deltamask.fl.training import evaluate

    exp = build_experiment(cfg.replace(cache_dtype=dtype))
    assert exp.train_h.dtype == prefix_cache.CACHE_DTYPES[dtype]
    assert exp.train_h.element_size() * 2 == ref.train_h.element_size()
    tol = 1e-3 if dtype == "float16" else 1e-2  # 11 / 8 significant bits
    assert torch.allclose(exp.train_h.float(), ref.train_h, rtol=tol, atol=tol)
    acc, _ = evaluate(exp.net, exp.test_h, exp.test_y, None)  # rows cast to float32 per batch
    want, _ = evaluate(ref.net, ref.test_h, ref.test_y, None)
    assert abs(acc - want) <= 0.03
    assert len(_replies(exp, exp.client_data(PID), cfg)) == 2  # training reads half-precision rows


# --- budget errors: one line naming the key, exit 2, nothing written ----------------------------------

def test_ram_cache_above_the_budget_names_the_key(cfg) -> None:
    with pytest.raises(ConfigError, match="'prefix_cache'.*cache_ram_mb=1"):
        build_experiment(cfg.replace(prefix_cache="ram", cache_ram_mb=1))
    with pytest.raises(ConfigError, match="'cache_ram_mb'"):
        build_config({"cache_ram_mb": -1})
    with pytest.raises(ConfigError, match="'cache_dtype' must be one of"):
        build_config({"cache_dtype": "int8"})


def test_disk_cache_without_space_names_cache_dir_and_writes_nothing(cfg, tmp_path, monkeypatch) -> None:
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(prefix_cache.shutil, "disk_usage", lambda p: usage(1 << 30, 1 << 30, 1 << 20))
    with pytest.raises(ConfigError, match="'cache_dir'.*free"):
        build_experiment(cfg.replace(prefix_cache="disk", cache_dir=str(tmp_path)))
    assert list(tmp_path.iterdir()) == []


def test_cli_exit_2_with_one_line_and_no_run_written(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    sets = [f"{k}={v}" for k, v in {**_tiny_sets(), "prefix_cache": "ram", "cache_ram_mb": 1}.items()]
    code = cli.main(["run", "--out", str(out), *sum((["--set", s] for s in sets), [])])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "prefix_cache" in err[0] and "cache_ram_mb" in err[0], err
    assert not out.exists()


def _tiny_sets() -> dict:
    from dmtest import TINY

    return dict(TINY)


# --- the Flower node path -----------------------------------------------------------------------------

def test_node_cache_honours_dtype_and_disk_store(cfg, ref, tmp_path) -> None:
    c16 = cfg.replace(cache_dtype="float16")
    exp, data, hit = client_experiment_cached(c16, PID, tmp_path / "node")
    assert not hit and data.h.dtype == torch.float16
    exp, data, hit = client_experiment_cached(c16, PID, tmp_path / "node")
    assert hit and data.h.dtype == torch.float16
    assert torch.allclose(data.h.float(), ref.client_data(PID).h, rtol=1e-3, atol=1e-3)
    # the disk store from a hit (the entry's key ignores where the rows live) and from a build
    disk = cfg.replace(prefix_cache="disk", cache_dir=str(tmp_path / "spill"))
    client_experiment_cached(cfg, PID, tmp_path / "node32")
    for node in ("node32", "fresh"):
        exp, data, hit = client_experiment_cached(disk, PID, tmp_path / node)
        assert hit == (node == "node32") and isinstance(data.h, DiskRows) and exp.cache_where == "disk"
        want = ref.client_data(PID)
        assert torch.equal(data.h[:], want.h)
        assert _replies(exp, data, cfg) == _replies(ref, want, cfg)


# --- streamed images ------------------------------------------------------------------------------------

def _png(path: Path, size: tuple[int, int], value: int, mode: str = "RGB") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    arr = rng.integers(0, 256, (size[1], size[0]) if mode == "L" else (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr, mode=mode).save(path)


def _same(a, b) -> None:  # noqa: ANN001
    for split in ("train", "test"):
        x, y = getattr(a, f"x_{split}"), getattr(b, f"x_{split}")
        assert isinstance(x, ImageSource) and isinstance(y, np.ndarray)
        assert x.shape == y.shape and x.dtype == y.dtype
        assert np.array_equal(x[:], y) and np.array_equal(np.asarray(x), y)
        assert np.array_equal(getattr(a, f"y_{split}"), getattr(b, f"y_{split}"))
        if len(y):
            assert np.array_equal(x[len(y) - 1], y[-1]) and np.array_equal(x[np.array([len(y) - 1, 0])], y[[-1, 0]])


def test_streamed_folder_gives_the_eager_arrays(tmp_path) -> None:
    root = tmp_path / "imgs"
    for i in range(6):
        _png(root / "zebra" / f"{i}.png", (10, 8), i)
        _png(root / "ant" / f"{i}.png", (10, 8), 100 + i, mode="L")
    _png(root / "ant" / "odd.png", (20, 20), 50)  # another size: resized
    eager = load_dataset(f"folder:{root}", seed=0, test_fraction=0.3)
    lazy = load_dataset(f"folder:{root}", seed=0, test_fraction=0.3, stream=True)
    _same(lazy, eager)
    _same(subsample(lazy, 5, 2, 3), subsample(eager, 5, 2, 3))


def test_streamed_hf_gives_the_eager_arrays(tmp_path) -> None:
    import datasets
    from PIL import Image

    def split(n: int, seed: int, hw: tuple[int, int]):  # noqa: ANN202
        rng = np.random.default_rng(seed)
        images = [Image.fromarray(rng.integers(0, 256, (*hw, 3) if i % 2 else hw, dtype=np.uint8)) for i in range(n)]
        images[0] = images[0].resize((hw[1] + 3, hw[0] + 1))  # one odd size, resized to the common one
        feats = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
        return datasets.Dataset.from_dict({"img": images, "label": [i % 2 for i in range(n)]}, features=feats)

    datasets.DatasetDict({"train": split(9, 0, (6, 7)), "test": split(5, 1, (4, 4))}).save_to_disk(str(tmp_path / "dd"))
    split(8, 2, (5, 5)).save_to_disk(str(tmp_path / "one"))
    for spec in (f"hf:{tmp_path / 'dd'}", f"hf:{tmp_path / 'one'}"):
        _same(load_dataset(spec, seed=1, stream=True), load_dataset(spec, seed=1))


def test_build_experiment_streams_folder_images(tmp_path) -> None:
    root = tmp_path / "imgs"
    for c in ("a", "b", "c"):
        for i in range(12):
            _png(root / c / f"{i}.png", (12, 12), hash((c, i)) % 1000)
    cfg = tiny_config(dataset=f"folder:{root}", train_samples=0, test_samples=0, num_clients=2, clients_per_round=1, min_partition_size=2)
    exp = build_experiment(cfg)
    assert isinstance(exp.dataset.x_train, ImageSource)
    assert len(exp.train_h) == len(exp.dataset.x_train)
