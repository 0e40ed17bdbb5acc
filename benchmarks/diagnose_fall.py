"""What walks DeltaMask downhill (issue 25)? Per round of one run, beside the global accuracy the run reports:

* ``refit``      test accuracy of a head fitted centrally (multinomial logistic regression on the whole training
                 set) to the round's masked features: what the features are worth with a head that fits them;
* ``head_then``  the warm-up head (the one the mask rounds keep frozen) on the round's features: the same as the
                 run's accuracy unless the head is trained jointly;
* ``top_share``  the share of test images the global model puts in its most predicted class (1/C when it
                 predicts the classes evenly; near 1 when the shared model was pulled to one client's classes);
* ``density``    the deterministic mask's density (pruned weights accumulate as it falls).

If the features kept their worth (``refit`` steady or rising) while the run's accuracy falls, the fall is the
frozen head no longer fitting features that moved; a rising ``top_share`` says towards which classes.

    python benchmarks/diagnose_fall.py --out runs/diagnose --seed 5                   # the fmnist3-dinov2 case
    python benchmarks/diagnose_fall.py --out runs/diagnose --seed 5 --set client_loss=balanced

Writes ``OUT/diagnose-<label>.jsonl`` (one line per evaluated round) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from bench_skew import COMMON, SETUPS, SPLITS, write_fmnist3  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--setup", default="fmnist3-dinov2", choices=sorted(k for k, (p, _) in SETUPS.items() if p is None))
    ap.add_argument("--split", default="a0.5-3of6", choices=[k for k, v in SPLITS.items() if v])
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--set", action="append", default=[], help="key=value (repeatable)")
    args = ap.parse_args(argv)

    from sklearn.linear_model import LogisticRegression

    import deltamask.run.round as round_mod
    from deltamask.config import build_config
    from deltamask.engines.local import run_local
    from deltamask.fl.training import compute_features

    out = Path(args.out).resolve()
    if args.setup == "fmnist3-dinov2" and not (out / "fmnist3.npz").exists():
        write_fmnist3(out / "fmnist3.npz")
    _, setup_keys = SETUPS[args.setup]
    alpha, nc, cpr = SPLITS[args.split]  # type: ignore[misc]
    keys = {**COMMON, **{k: v.format(out=out) if isinstance(v, str) else v for k, v in setup_keys.items()},
            "alpha": alpha, "num_clients": nc, "clients_per_round": cpr, "seed": args.seed, "progress": False,
            **dict(x.split("=", 1) for x in args.set)}
    cfg = build_config({k: str(v) for k, v in keys.items()}, from_strings=True)
    label = f"{args.setup}-{args.split}-s{args.seed}" + "".join(f"-{x}" for x in args.set)
    rows: list[dict] = []
    warm_head: dict[str, torch.Tensor] = {}
    original = round_mod.evaluate_global

    def diagnosed(exp, state, rnd):  # type: ignore[no-untyped-def]
        res = original(exp, state, rnd)
        mask = exp.method.eval_mask(state)
        with torch.no_grad():
            f_tr = compute_features(exp.net, exp.train_h, mask).cpu().numpy()
            f_te = compute_features(exp.net, exp.test_h, mask).cpu().numpy()
            logits = exp.net.head(torch.from_numpy(f_te)).numpy()
        y_tr, y_te = exp.train_y.cpu().numpy(), exp.test_y.cpu().numpy()
        mu, sd = f_tr.mean(0), f_tr.std(0) + 1e-6
        clf = LogisticRegression(max_iter=2000, C=1.0).fit((f_tr - mu) / sd, y_tr)
        refit = float(clf.score((f_te - mu) / sd, y_te))
        if rnd == exp.cfg.head_warmup_rounds:
            warm_head["w"] = torch.from_numpy(state.head_weight.copy())
            warm_head["b"] = torch.from_numpy(state.head_bias.copy())
        head_then = None
        if warm_head:
            head_then = float(((torch.from_numpy(f_te) @ warm_head["w"].T + warm_head["b"]).argmax(1).numpy() == y_te).mean())
        pred = logits.argmax(1)
        share = float(np.bincount(pred, minlength=logits.shape[1]).max() / len(pred))
        row = {"round": rnd, "accuracy": res["accuracy"], "refit": refit, "head_then": head_then, "top_share": share,
               "top_class": int(np.bincount(pred).argmax()), "density": res.get("mask_density")}
        rows.append(row)
        print(json.dumps(row), flush=True)
        return res

    round_mod.evaluate_global = diagnosed
    try:
        run_local(cfg, out / label, resume=False)
    finally:
        round_mod.evaluate_global = original
    with open(out / f"diagnose-{label}.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"\n{label}\n| round | accuracy | refit head | warm-up head | top class share | density |\n|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ht = "-" if r["head_then"] is None else f"{r['head_then']:.3f}"
        print(f"| {r['round']} | {r['accuracy']:.3f} | {r['refit']:.3f} | {ht} | {r['top_share']:.2f} (class {r['top_class']}) | "
              f"{r['density'] if r['density'] is None else round(r['density'], 4)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
