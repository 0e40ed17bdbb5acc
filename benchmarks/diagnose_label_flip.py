"""Where does label flipping hurt DeltaMask: in the head warm-up or in the mask rounds? (issue 21)

    python benchmarks/diagnose_label_flip.py 0,1,2      # seeds

The quick attack setup of ``bench_attacks.py`` (digits, EfficientNet-Lite0 at 32 px, 600 / 300 images, 10 clients all
selected, 2 head warm-up + 3 mask rounds, today's defaults), 3 of 10 clients (``bench_attacks.malicious_ids``)
training honestly on labels ``C-1-y``: in no round, in every round, in the warm-up rounds only, in the mask rounds
only. Prints each run's accuracy per round.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_attacks as ba  # noqa: E402


def main(seeds: list[int]) -> None:
    import torch

    from deltamask.config import build_config, from_sources
    from deltamask.engines.local import run_local
    from deltamask.methods import create_method
    from deltamask.run.experiment import build_experiment
    from deltamask.testing.faults import Attack

    sets = ("dataset=digits image_size=32 train_samples=600 test_samples=300 rounds=5 head_warmup_rounds=2 "
            "masked_blocks=2 progress=false").split()
    base = from_sources(None, sets)
    base = build_config({"clients_per_round": base.num_clients}, base=base)
    warm = set(range(1, base.head_warmup_rounds + 1))
    phases = {"none": set(), "all": set(range(1, base.rounds + 1)), "warm-up only": warm,
              "mask rounds only": set(range(base.head_warmup_rounds + 1, base.rounds + 1))}
    for seed in seeds:
        cfg = build_config({"seed": seed}, base=base)
        exp = build_experiment(cfg)
        head0 = (exp.net.head.weight.detach().clone(), exp.net.head.bias.detach().clone())
        bad = ba.malicious_ids(seed, cfg.num_clients, 3)
        for name, rounds in phases.items():
            with torch.no_grad():  # every run starts from the head as built
                exp.net.head.weight.copy_(head0[0])
                exp.net.head.bias.copy_(head0[1])
            exp.cfg, exp.method = cfg, create_method(cfg, exp.net)

            def fault(r: int, c: int, rounds: set[int] = rounds) -> Attack | None:
                return Attack("label-flip", seed) if c in bad and r in rounds else None

            out = tempfile.mkdtemp(prefix="dm-labelflip-")
            t0 = time.time()
            run_local(cfg, out, fault=fault, experiment=exp)
            accs = [round(json.loads(line)["accuracy"], 3) for line in open(Path(out) / "metrics.jsonl")]
            print(f"seed {seed} malicious {bad} label-flip {name:16s} accuracy per round {accs} ({time.time() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    main([int(s) for s in (sys.argv[1] if len(sys.argv) > 1 else "0,1").split(",")])
