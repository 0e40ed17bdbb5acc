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

from . import data as data_mod
from .config import Config, ConfigError
from .masking import MaskedNetwork
from .methods import ClientData, Method, create_method
from .models import LoadedModel, load_model

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
def prefix_outputs(net: MaskedNetwork, x: np.ndarray, size: int, mean: tuple, std: tuple, device: torch.device, batch: int = 256) -> torch.Tensor:
    """Preprocess uint8 images in chunks and run them through the mask-independent prefix."""
    net.eval()
    outs = []
    for i in range(0, len(x), batch):
        xb = data_mod.preprocess(x[i : i + batch], size, mean, std).to(device)
        outs.append(net.prefix(xb))
    if not outs:
        raise ValueError("no images to process")
    return torch.cat(outs)


@dataclass
class Experiment:
    cfg: Config
    device: torch.device
    net: MaskedNetwork
    method: Method
    dataset: data_mod.ImageDataset
    partitions: list[np.ndarray]  # per client, indices into train_h (empty for clients not loaded here)
    client_sizes: list[int]  # per client, samples in the federation's split (whichever clients are loaded)
    train_h: torch.Tensor
    train_y: torch.Tensor
    test_h: torch.Tensor
    test_y: torch.Tensor
    image_size: int
    setup_seconds: float

    def client_data(self, cid: int) -> ClientData:
        idx = torch.from_numpy(self.partitions[cid])
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
            "masked_params": self.net.masked_names,
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
    ds = data_mod.load_dataset(cfg.dataset, seed=cfg.seed, data_dir=cfg.data_dir or None)
    ds = data_mod.subsample(ds, cfg.train_samples or None, cfg.test_samples or None, cfg.seed)
    parts = data_mod.partition(ds.y_train, cfg.num_clients, cfg.partition, cfg.alpha, cfg.seed, cfg.min_partition_size)
    client_sizes = [int(len(p)) for p in parts]
    net = MaskedNetwork(loaded, ds.num_classes, cfg.masked_blocks, cfg.mask_pattern).to(device)
    size = cfg.image_size or loaded.input_size
    say(f"caching prefix outputs ({net.first_masked_stage} frozen stages) at {size}px")
    if clients is None:
        train_x, train_y = ds.x_train, ds.y_train
    else:
        keep = np.sort(np.concatenate([parts[c] for c in clients])) if clients else np.zeros(0, np.int64)
        remap = np.full(len(ds.y_train), -1, dtype=np.int64)
        remap[keep] = np.arange(len(keep))
        parts = [remap[p] if c in clients else np.zeros(0, np.int64) for c, p in enumerate(parts)]
        train_x, train_y = ds.x_train[keep], ds.y_train[keep]
    train_h = prefix_outputs(net, train_x, size, loaded.mean, loaded.std, device) if len(train_x) else torch.zeros(0)
    if test:
        test_h = prefix_outputs(net, ds.x_test, size, loaded.mean, loaded.std, device)
        test_y = torch.from_numpy(np.asarray(ds.y_test, dtype=np.int64))
    else:
        test_h = torch.zeros((0, *train_h.shape[1:]), dtype=train_h.dtype, device=train_h.device)
        test_y = torch.zeros(0, dtype=torch.int64)
    method = create_method(cfg, net)
    return Experiment(
        cfg=cfg,
        device=device,
        net=net,
        method=method,
        dataset=ds,
        partitions=parts,
        client_sizes=client_sizes,
        train_h=train_h,
        train_y=torch.from_numpy(np.asarray(train_y, dtype=np.int64)),
        test_h=test_h,
        test_y=test_y,
        image_size=size,
        setup_seconds=time.time() - t0,
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
    ``pid``'s stored prefix outputs and labels (see :mod:`deltamask.node_cache`) instead of from the data
    set: same model (same torch seed before ``load_model``), same partitions, same ``client_data(pid)``.

    ``train_h`` is moved to ``cfg``'s device; ``train_y`` stays on the CPU (as in ``build_experiment``).
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
        test_h=torch.zeros((0, *train_h.shape[1:]), dtype=train_h.dtype, device=train_h.device),
        test_y=torch.zeros(0, dtype=torch.int64),
        image_size=size,
        setup_seconds=time.time() - t0,
    )
