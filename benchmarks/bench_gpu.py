"""GPU benchmark (issue 11, item 6): masked local training vs dense fine-tuning of the same blocks, and the
fuse filter's query-all on CUDA.

    python benchmarks/bench_gpu.py                      # ViT-B/16 at 224 px, last 4 blocks, batch 64, bf16
    python benchmarks/bench_gpu.py --device cpu --model timm:vit_tiny_patch16_224 --batch 8 --steps 3 \
        --image-size 64 --filter-n 2000000                # a smoke run anywhere (numbers meaningless)

Both trainers start from the same cached prefix outputs (the mask-independent blocks are computed once,
as in a real run) and run the same number of Adam steps on the same batches under
``torch.autocast(dtype=bfloat16)``:

* ``masked``: deltamask's own client step (:func:`deltamask.fl.training.train_scores`): a fresh Bernoulli mask
  per forward pass over every weight matrix of the masked blocks, straight-through gradient to the scores.
* ``dense``: plain fine-tuning of the same blocks' weights (all parameters of those blocks trainable,
  no parametrization), Adam, the same head and batches.
* ``delta``: the FedAvg baseline's trainer (a flat weight delta through the same parametrization).

Reported: images per second (median of ``--repeats`` timed passes after a warm-up pass), the ratio
masked / dense, and peak CUDA memory. The filter part times ``decode_mask_torch`` (query of all N
indices) for ``fuse8`` and ``fuse16-4w`` at N = 86M with 0.4% keys, against the CPU decoder, and checks
the two agree bit for bit. Results: ``benchmarks/RESULTS.md`` with the card's name (``--json`` writes them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from deltamask.fl.training import run_epochs, train_scores
from deltamask.app.machine import machine_info
from deltamask.model.masking import MaskedNetwork
from deltamask.model.backbones import load_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int) -> list[float]:  # noqa: ANN001
    fn()  # warm-up: kernels, allocator, autotuning
    out = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t)
    return out


def bench_training(args: argparse.Namespace, device: torch.device) -> dict:
    torch.manual_seed(0)
    lm = load_model(args.model, "random", image_size=args.image_size)
    net = MaskedNetwork(lm, 10, masked_blocks=args.blocks).to(device)
    n_img = args.batch * args.steps
    with torch.no_grad():
        x = torch.randn(n_img, 3, args.image_size, args.image_size, device=device)
        h = torch.cat([net.prefix(x[i : i + args.batch]) for i in range(0, n_img, args.batch)])
    y = torch.randint(0, 10, (n_img,), device=device)
    theta = torch.full((net.num_masked,), 0.99, device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=not args.fp32)

    def masked() -> None:
        g1 = torch.Generator().manual_seed(1)
        g2 = torch.Generator(device=device).manual_seed(2)
        with amp:
            train_scores(net, theta, h, y, epochs=1, batch_size=args.batch, lr=0.1, eps=0.01, shuffle_gen=g1, mask_gen=g2)

    def delta() -> None:
        d = torch.zeros(net.num_masked, device=device, requires_grad=True)
        opt = torch.optim.Adam([d], lr=1e-4)
        net.train()
        with amp:
            run_epochs(net, h, y, opt, epochs=1, batch_size=args.batch, shuffle_gen=torch.Generator().manual_seed(1),
                       before_forward=lambda: net.use_weight_delta(d))
        net.use_weight_delta(None)
        net.eval()

    # dense: the same architecture without parametrizations, the same blocks' parameters trainable
    torch.manual_seed(0)
    plain = load_model(args.model, "random", image_size=args.image_size)
    bb = plain.backbone.to(device)
    first = net.first_masked_stage
    head = torch.nn.Linear(bb.feature_dim, 10).to(device)
    trainable = [p for st in bb.stages[first:] for p in st.parameters()]
    for p in trainable:
        p.requires_grad_(True)

    def dense() -> None:
        opt = torch.optim.Adam(trainable, lr=1e-4)
        perm = torch.randperm(n_img, generator=torch.Generator().manual_seed(1))
        bb.eval()
        with amp:
            for i in range(0, n_img, args.batch):
                idx = perm[i : i + args.batch].to(device)
                loss = F.cross_entropy(head(bb(h[idx], first, None)), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

    out: dict = {
        "model": args.model,
        "image_size": args.image_size,
        "masked_blocks": args.blocks,
        "batch": args.batch,
        "steps": args.steps,
        "dtype": "fp32" if args.fp32 else "bf16 autocast",
        "num_masked": int(net.num_masked),
        "num_trainable_dense": int(sum(p.numel() for p in trainable)),
    }
    for name, fn in (("masked", masked), ("dense", dense), ("delta", delta)):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        ts = _timed(fn, device, args.repeats)
        med = statistics.median(ts)
        out[name] = {"images_per_s": n_img / med, "seconds": ts}
        if device.type == "cuda":
            out[name]["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        print(f"[train] {name:6s} {n_img / med:9.1f} img/s (median of {len(ts)})", flush=True)
    out["masked_over_dense"] = out["masked"]["images_per_s"] / out["dense"]["images_per_s"]
    print(f"[train] masked / dense throughput: {out['masked_over_dense']:.2f}x", flush=True)
    return out


def bench_filter(args: argparse.Namespace, device: torch.device) -> dict:
    from deltamask.codecs import get_codec

    n = args.filter_n
    k = max(1, int(n * 0.004))
    keys = np.sort(np.random.default_rng(0).choice(n, k, replace=False))
    out: dict = {"n": n, "keys": k}
    for name in ("fuse8", "fuse16-4w"):
        codec = get_codec(name)
        payload = codec.encode(keys, n, seed=5)
        ref = codec.decode_mask(payload, expect_n=n)
        got = codec.decode_mask_torch(payload, device, expect_n=n)
        if not np.array_equal(got.cpu().numpy(), ref):
            raise SystemExit(f"{name}: the {device} query disagrees with the CPU decoder")
        t_dev = statistics.median(_timed(lambda: codec.decode_mask_torch(payload, device, expect_n=n), device, args.repeats))
        t_cpu = statistics.median(_timed(lambda: codec.decode_mask(payload, expect_n=n), torch.device("cpu"), args.repeats))
        out[name] = {"bytes": len(payload), f"{device.type}_s": t_dev, "cpu_numpy_s": t_cpu, "speedup": t_cpu / t_dev}
        print(f"[filter] {name:9s} query-all N={n:,}: {device.type} {t_dev * 1e3:.1f} ms, CPU {t_cpu * 1e3:.1f} ms ({t_cpu / t_dev:.1f}x)", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="timm:vit_base_patch16_224")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--blocks", type=int, default=4, help="masked / fine-tuned last blocks")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per timed pass")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    ap.add_argument("--filter-n", type=int, default=86_000_000)
    ap.add_argument("--skip-filter", action="store_true")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; pass --device cpu for a smoke run", file=sys.stderr)
        return 2
    res = {"machine": machine_info(), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    print(f"bench_gpu on {res['device']} (torch {res['torch']})", flush=True)
    res["train"] = bench_training(args, device)
    if not args.skip_filter:
        res["filter"] = bench_filter(args, device)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
