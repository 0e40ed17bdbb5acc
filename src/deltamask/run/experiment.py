"""What every engine builds before round 1: model, data, partition, prefix cache, method.

Engines share this so that, for the same config and seed, the local simulator and Flower start from
identical tensors. The mask-independent prefix of the backbone is computed here once per image
(:meth:`MaskedNetwork.prefix`) and reused by every round and local epoch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from .. import data as data_mod
from ..config import Config, ConfigError
from ..model.masking import MaskedNetwork
from ..methods import ClientData, Method, create_method
from ..model.backbones import LoadedModel, load_model
from ..model.prefix_cache import CachePlan, DiskRows, DiskStore, PrefixRows, plan_cache

log = logging.getLogger("deltamask")


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"config key 'device': {spec!r} is not a torch device (auto, cpu, cuda, cuda:0, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'device': CUDA was asked for but is not available; use device=auto or cpu")
    return dev


@torch.no_grad()
def prefix_row_shape(net: MaskedNetwork, size: int, device: torch.device) -> tuple[int, ...]:
    """Shape of one image's prefix output (one forward of a blank image), known before any real image
    is processed so that the cache can be planned (:func:`~deltamask.model.prefix_cache.plan_cache`)."""
    net.eval()
    return tuple(net.prefix(torch.zeros((1, 3, size, size), device=device)).shape[1:])


@torch.no_grad()
def prefix_outputs(
    net: MaskedNetwork,
    x: Any,
    size: int,
    mean: tuple,
    std: tuple,
    device: torch.device,
    batch: int = 256,
    out: torch.Tensor | DiskStore | None = None,
) -> PrefixRows:
    """Preprocess uint8 images in chunks of ``batch`` and run them through the mask-independent prefix.

    ``x`` is a uint8 ``[n, h, w, 3]`` array or a streamed image source (:mod:`deltamask.data`); only one
    chunk of images is ever decoded and turned into floats. Each chunk's outputs go straight into ``out``:
    a preallocated tensor (of the cache's dtype; cast on copy) or a :class:`DiskStore` (appended), so the
    peak is the store plus one chunk (no list of chunks and ``torch.cat``). ``out=None``: a new float32
    tensor on ``device``. Returns the tensor, or :class:`DiskRows` over the store."""
    net.eval()
    n = len(x)
    if not n:
        raise ValueError("no images to process")
    for i in range(0, n, batch):
        xb = data_mod.preprocess(x[i : i + batch], size, mean, std).to(device)
        hb = net.prefix(xb)
        if out is None:
            out = torch.empty((n, *hb.shape[1:]), dtype=hb.dtype, device=device)
        if isinstance(out, DiskStore):
            out.append(hb)
        else:
            out[i : i + len(hb)] = hb
    return DiskRows(out) if isinstance(out, DiskStore) else out


def _new_store(plan: CachePlan, n: int, row_shape: tuple[int, ...], device: torch.device, tag: str) -> torch.Tensor | DiskStore:
    if plan.where == "disk":
        assert plan.directory is not None
        return DiskStore(plan.directory, n, row_shape, plan.dtype, tag)
    return torch.empty((n, *row_shape), dtype=plan.dtype, device=device)


@dataclass
class Experiment:
    cfg: Config
    device: torch.device
    net: MaskedNetwork
    method: Method
    dataset: data_mod.ImageDataset
    partitions: list[np.ndarray]  # per client, indices into train_h (empty for clients not loaded here)
    client_sizes: list[int]  # per client, samples in the federation's split (whichever clients are loaded)
    train_h: PrefixRows  # prefix outputs: a tensor of cfg.cache_dtype on the device, or DiskRows
    train_y: torch.Tensor
    test_h: PrefixRows
    test_y: torch.Tensor
    image_size: int
    setup_seconds: float
    cache_where: str = "ram"  # where the prefix outputs live (prefix_cache.plan_cache): ram or disk
    #: the server's root set (``root_samples``, FLTrust): labelled prefix outputs from training images no
    #: client holds; built where the server is (``test=True``), None otherwise or when root_samples is 0
    root: ClientData | None = None

    def client_data(self, cid: int) -> ClientData:
        """Client ``cid``'s rows: a copy of them for an in-RAM cache, a view (row indices, read per batch)
        for a disk cache."""
        idx = torch.from_numpy(self.partitions[cid])
        if isinstance(self.train_h, DiskRows):
            return ClientData(cid, self.train_h.select(self.partitions[cid]), self.train_y[idx])
        return ClientData(cid, self.train_h[idx.to(self.train_h.device)], self.train_y[idx])

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.cfg.method,
            "model": self.cfg.model,
            "dataset": self.cfg.dataset,
            "num_masked_params": self.net.num_masked,
            "num_backbone_params": self.net.num_backbone_params,
            "num_classes": self.dataset.num_classes,
            "num_train": int(len(self.dataset.y_train)),
            "num_test": int(self.test_y.shape[0]),
            "client_sizes": self.client_sizes,
            "image_size": self.image_size,
            "device": str(self.device),
            "prefix_cache": self.cache_where,
            "cache_dtype": self.cfg.cache_dtype,
            "masked_params": self.net.masked_names,
            # image files the data set left out (unreadable, decompression bombs): how many, and the first few
            "data_skipped": len(getattr(self.dataset, "skipped", [])),
            "data_skipped_files": list(getattr(self.dataset, "skipped", []))[:10],
            **({"root_samples": self.root.num_samples} if self.root is not None else {}),
        }


def _load_backbone(cfg: Config, say: Callable[[str], None]) -> tuple[torch.device, LoadedModel]:
    """The device and the loaded backbone, after seeding torch with the run seed: every engine and the
    node cache build the same model (the head's init follows from this seed)."""
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    say(f"loading model {cfg.model}")
    return device, load_model(cfg.model, cfg.weights, image_size=cfg.image_size)


def build_experiment(
    cfg: Config, status: Callable[[str], None] | None = None, clients: list[int] | None = None, test: bool = True
) -> Experiment:
    """Load everything for ``cfg``. ``clients`` limits the prefix cache to those clients' data
    (a Flower client process needs only its own partition). ``test=False`` skips the test set's prefix
    outputs (``test_h`` / ``test_y`` are then empty): a client never evaluates, so a client process
    should pass it. Everything else is the same tensors either way."""
    say = status or (lambda s: None)
    t0 = time.time()
    device, loaded = _load_backbone(cfg, say)
    say(f"loading dataset {cfg.dataset}")
    # folder: / hf: images are streamed (decoded a prefix chunk at a time), never all held in RAM
    full = data_mod.load_dataset(cfg.dataset, seed=cfg.seed, data_dir=cfg.data_dir or None, stream=True)
    ds = data_mod.subsample(full, cfg.train_samples or None, cfg.test_samples or None, cfg.seed)
    # the server's root set: training images outside the clients' subset (refused before any work if too few)
    root_xy = data_mod.server_root(full, cfg.train_samples or None, cfg.root_samples, cfg.seed) if cfg.root_samples and test else None
    del full
    parts = data_mod.partition(ds.y_train, cfg.num_clients, cfg.partition, cfg.alpha, cfg.seed, cfg.min_partition_size)
    client_sizes = [int(len(p)) for p in parts]
    net = MaskedNetwork(loaded, ds.num_classes, cfg.masked_blocks, cfg.mask_pattern).to(device)
    size = cfg.image_size or loaded.input_size
    if clients is None:
        train_x, train_y = ds.x_train, ds.y_train
    else:
        keep = np.sort(np.concatenate([parts[c] for c in clients])) if clients else np.zeros(0, np.int64)
        remap = np.full(len(ds.y_train), -1, dtype=np.int64)
        remap[keep] = np.arange(len(keep))
        parts = [remap[p] if c in clients else np.zeros(0, np.int64) for c, p in enumerate(parts)]
        train_x, train_y = data_mod.take(ds.x_train, keep), ds.y_train[keep]
    # Plan the cache before computing or writing anything: a cache that cannot fit fails here.
    row_shape = prefix_row_shape(net, size, device)
    plan = plan_cache(cfg, row_shape, len(train_x), len(ds.x_test) if test else 0)
    if net.backbone.staging_error:  # one opaque stage: the whole model runs every step (mask_pattern only)
        msg = f"{cfg.model} could not be cut into blocks ({net.backbone.staging_error}): no prefix cache, the whole model runs every step"
        log.warning(msg)
        say(msg)
    say(f"caching prefix outputs ({net.first_masked_stage} frozen stages) at {size}px, {cfg.cache_dtype} in {plan.where}")
    train_h: PrefixRows = (
        prefix_outputs(net, train_x, size, loaded.mean, loaded.std, device, out=_new_store(plan, len(train_x), row_shape, device, "train"))
        if len(train_x)
        else torch.zeros(0)
    )
    if test:
        test_h = prefix_outputs(net, ds.x_test, size, loaded.mean, loaded.std, device, out=_new_store(plan, len(ds.x_test), row_shape, device, "test"))
        test_y = torch.from_numpy(np.asarray(ds.y_test, dtype=np.int64))
    else:
        test_h = torch.zeros((0, *row_shape), dtype=plan.dtype, device=device)
        test_y = torch.zeros(0, dtype=torch.int64)
    root = None
    if root_xy is not None:
        say(f"caching the server's root set ({cfg.root_samples} images outside the clients' data)")
        root_h = prefix_outputs(net, root_xy[0], size, loaded.mean, loaded.std, device)
        root = ClientData(-1, root_h, torch.from_numpy(np.asarray(root_xy[1], dtype=np.int64)))
    method = create_method(cfg, net)
    return Experiment(
        cfg=cfg,
        device=device,
        net=net,
        method=method,
        root=root,
        dataset=ds,
        partitions=parts,
        client_sizes=client_sizes,
        train_h=train_h,
        train_y=torch.from_numpy(np.asarray(train_y, dtype=np.int64)),
        test_h=test_h,
        test_y=test_y,
        image_size=size,
        setup_seconds=time.time() - t0,
        cache_where=plan.where,
    )


def client_experiment_from_arrays(
    cfg: Config,
    pid: int,
    train_h: torch.Tensor,
    train_y: torch.Tensor,
    client_sizes: list[int],
    dataset_name: str,
    classes: list[str],
    status: Callable[[str], None] | None = None,
) -> Experiment:
    """The Experiment ``build_experiment(cfg, clients=[pid], test=False)`` gives, rebuilt from client
    ``pid``'s stored prefix outputs and labels (see :mod:`deltamask.engines.flower.node_cache`) instead of from the data
    set: same model (same torch seed before ``load_model``), same partitions, same ``client_data(pid)``.

    ``train_h`` (in ``cfg.cache_dtype``) is moved to ``cfg``'s device, or into a disk store when
    ``cfg``'s cache plan says so (the entry's bytes were read whole once: a client's partition, not the
    data set); ``train_y`` stays on the CPU (as in ``build_experiment``).
    ``dataset`` holds the classes but no images; ``test_h`` / ``test_y`` are empty."""
    say = status or (lambda s: None)
    t0 = time.time()
    device, loaded = _load_backbone(cfg, say)
    net = MaskedNetwork(loaded, len(classes), cfg.masked_blocks, cfg.mask_pattern).to(device)
    net.eval()  # build_experiment leaves the network in eval mode (prefix_outputs)
    size = cfg.image_size or loaded.input_size
    n = int(train_y.shape[0])
    if int(train_h.shape[0]) != n or not 0 <= pid < len(client_sizes) or client_sizes[pid] != n:
        raise ValueError(f"client {pid}: {train_h.shape[0]} prefix outputs, {n} labels, client_sizes {client_sizes}")
    parts = [np.arange(n, dtype=np.int64) if c == pid else np.zeros(0, np.int64) for c in range(len(client_sizes))]
    no_images = np.zeros((0, 1, 1, 3), np.uint8)
    no_labels = np.zeros(0, np.int64)
    ds = data_mod.ImageDataset(dataset_name, no_images, no_labels, no_images, no_labels, list(classes))
    row_shape = tuple(train_h.shape[1:])
    plan = plan_cache(cfg, row_shape, n, 0)
    if n and train_h.dtype != plan.dtype:
        raise ValueError(f"client {pid}: stored prefix outputs are {train_h.dtype}, cache_dtype={cfg.cache_dtype} asks for {plan.dtype}")
    if n and plan.where == "disk":
        store = _new_store(plan, n, row_shape, device, "train")
        assert isinstance(store, DiskStore)
        for i in range(0, n, 1024):
            store.append(train_h[i : i + 1024])
        del train_h
        train_h = DiskRows(store)  # type: ignore[assignment]
    else:
        train_h = train_h.to(device) if n else torch.zeros(0)
    return Experiment(
        cfg=cfg,
        device=device,
        net=net,
        method=create_method(cfg, net),
        dataset=ds,
        partitions=parts,
        client_sizes=[int(s) for s in client_sizes],
        train_h=train_h,
        train_y=train_y.to("cpu", torch.int64),
        test_h=torch.zeros((0, *row_shape), dtype=plan.dtype, device=device),
        test_y=torch.zeros(0, dtype=torch.int64),
        image_size=size,
        setup_seconds=time.time() - t0,
        cache_where=plan.where,
    )
