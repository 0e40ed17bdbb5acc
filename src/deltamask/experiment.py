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
from .models import load_model

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


def build_experiment(cfg: Config, status: Callable[[str], None] | None = None, clients: list[int] | None = None) -> Experiment:
    """Load everything for ``cfg``. ``clients`` limits the prefix cache to those clients' data
    (a Flower client process needs only its own partition); the test set is always prepared."""
    say = status or (lambda s: None)
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    say(f"loading model {cfg.model}")
    loaded = load_model(cfg.model, cfg.weights)
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
    test_h = prefix_outputs(net, ds.x_test, size, loaded.mean, loaded.std, device)
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
        test_y=torch.from_numpy(np.asarray(ds.y_test, dtype=np.int64)),
        image_size=size,
        setup_seconds=time.time() - t0,
    )
