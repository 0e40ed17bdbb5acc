"""Worked example (docs/architecture.md, "add a model family"): a backbone zoo deltamask does not know.

A model family tells ``model=`` how to recognise a spec, build the model and stage it. Here the "zoo" is a
small convolutional network defined in this file (``tinycnn:WIDTH``); a real one would call its own
``create_model``. Its blocks sit in a ``features`` container and its output is one final ``nn.Linear``, so
the generic staging that torchvision models use cuts it without any hand-written forward (the load-time
self-check compares the staged composition with the model's own forward).

    python examples/extend/add_model_family.py        # a 3-round federated run on it (about 20 s on a CPU)
"""

from __future__ import annotations

import sys
import tempfile

import torch
from torch import nn

from deltamask.config import build_config
from deltamask.engines.local import run_local
from deltamask.model.backbones import (IMAGENET_MEAN, IMAGENET_STD, RANDOM_WEIGHTS, ModelFamily, load_model,
                                       register_model_family, stage_torchvision)


class TinyCNN(nn.Module):
    def __init__(self, width: int, classes: int = 1000) -> None:
        super().__init__()
        self.features = nn.Sequential(*[  # the blocks: deltamask masks the last masked_blocks of them
            nn.Sequential(nn.Conv2d(3 if i == 0 else width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
            for i in range(4)
        ])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(width, classes)  # dropped: deltamask trains its own head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def build_tinycnn(arg: str, weights: str, pretrained_online: bool, image_size: int):  # type: ignore[no-untyped-def]
    """(model, mean, std, own input size); ``weights``: empty = the family's pretrained weights (a fixed seed
    stands in for them here), ``random``, or a path to a state dict."""
    if not arg.isdigit():
        raise ValueError(f"tinycnn:WIDTH takes an integer width, got {arg!r}")
    if weights == RANDOM_WEIGHTS:
        model = TinyCNN(int(arg))  # from the caller's torch seed, as every family's random init
    else:
        with torch.random.fork_rng():  # "pretrained": the same weights every time; the caller's RNG is left alone
            torch.manual_seed(1234)
            model = TinyCNN(int(arg))
    if weights and weights != RANDOM_WEIGHTS:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(weights), strict=True)
    return model, IMAGENET_MEAN, IMAGENET_STD, 32


TINYCNN = register_model_family(ModelFamily(
    name="tinycnn",
    form="tinycnn:WIDTH (the worked example of docs/architecture.md)",
    build=build_tinycnn,
    stage=stage_torchvision,
    prefix="tinycnn:",
))


def main(out_dir: str | None = None, **overrides: object) -> dict:
    loaded = load_model("tinycnn:16", image_size=32)
    print(f"tinycnn:16 staged into {len(loaded.backbone.block_indices)} blocks")
    cfg = build_config({"model": "tinycnn:16", "dataset": "digits", "image_size": 32, "rounds": 3,
                        "head_warmup_rounds": 1, "num_clients": 3, "clients_per_round": 2, "train_samples": 240,
                        "test_samples": 90, "masked_blocks": 2, "progress": False, **overrides})
    with tempfile.TemporaryDirectory() as tmp:
        summary = run_local(cfg, out_dir or tmp)
    # random "pretrained" weights: the accuracy stays near chance; a real zoo's weights are what it fine-tunes
    print(f"{summary['num_masked_params']} masked weights, final accuracy {summary['final_accuracy']:.3f}, "
          f"uplink {summary['total_uplink_bytes']} bytes")
    return summary


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
