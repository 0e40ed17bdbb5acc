"""Honest runs, defenses off vs default, alternating in one process (the same experiment): median seconds per round and whether the trajectories are identical.

    python benchmarks/attack_overhead.py [REPS]     # REPS alternating pairs (default 3)
"""
import json, statistics, sys
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from bench_attacks import DEFENSES, run_one
from deltamask.config import build_config, from_sources
from deltamask.run.experiment import build_experiment
sets = "dataset=digits image_size=32 train_samples=600 test_samples=300 rounds=6 head_warmup_rounds=2 masked_blocks=2 clients_per_round=10 progress=false".split()
base = from_sources(None, sets)
exp = build_experiment(base)
head0 = (exp.net.head.weight.detach().clone(), exp.net.head.bias.detach().clone())
secs = {"off": [], "default": []}
accs = {"off": [], "default": []}
reps = int(sys.argv[1]) if len(sys.argv) > 1 else 3
for rep in range(reps):
    for d in ("off", "default"):
        cfg = build_config(DEFENSES[d], base=base)
        r = run_one(exp, head0, cfg, "none", [], 0)
        secs[d].append(r["round_seconds"]); accs[d].append(r["trajectory"])
        print(d, rep, r["round_seconds"], r["final_accuracy"], flush=True)
print(json.dumps({d: statistics.median(v) for d, v in secs.items()}), "ratio", statistics.median(secs["default"]) / statistics.median(secs["off"]))
print("pair ratios (default / off):", [round(b / a, 3) for a, b in zip(secs["off"], secs["default"])])
print("identical trajectories:", all(a == accs["off"][0] for a in accs["off"] + accs["default"]))
