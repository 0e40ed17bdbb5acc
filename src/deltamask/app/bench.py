"""``deltamask bench``: measured benchmarks (scripts, not timed tests). Targets: ``codecs`` and
``server`` (the server at foundation-model scale, :mod:`deltamask.app.bench_server`).

    deltamask bench codecs [--out DIR] [--n 86000000] [--fractions 0.001,0.005,0.01,0.05] [--repeats 3]

For each k/N it draws k uniform random indices out of N (seeded) and, for every registered index
codec, records: bits per key and bits per position (bpp) of the real payload against the bound
``log2 C(N, k)``, expected and measured false positives (query of all N indices), and encode /
decode times (minimum over repeats; decode = the index list for exact codecs, query-all for
filters; ``decode_mask`` = the N-bit membership for all). Filters are also built at exactly 10^6
keys (the paper's reference size) for the bits/key and build-time targets, the numba JIT cost is
measured once before anything else and reported separately, and the numpy and torch query paths
are timed on one configuration (torch on CUDA when available). Writes ``codecs.json`` and
``codecs.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .machine import machine_info

DEFAULT_N = 86_000_000
DEFAULT_FRACTIONS = (0.001, 0.005, 0.01, 0.05)
TARGETS = {
    "fuse8_bits_per_key_1e6": 9.1,
    "fuse8-4w_bits_per_key_1e6": 8.7,
    "fuse16_bits_per_key_1e6": 18.1,
    "build_1e6_s": 0.2,
    "query_all_86M_s": 1.5,
    "exact_over_bound": 0.015,
    "exact_encode_decode_860k_s": 0.5,
}


def add_bench_parser(subparsers: Any) -> None:
    """Register the ``bench`` sub-command (targets ``codecs``, ``server``) on an argparse subparsers object."""
    p = subparsers.add_parser("bench", help="run a benchmark and write JSON + markdown",
                              description="Measured benchmarks; results go to --out as JSON and markdown.")
    p.add_argument("target", choices=["codecs", "server"], help="what to benchmark")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out"), help="output directory")
    p.add_argument("--n", type=int, default=DEFAULT_N, help=f"universe size N (default {DEFAULT_N})")
    p.add_argument("--fractions", type=lambda s: [float(x) for x in s.split(",") if x],
                   default=list(DEFAULT_FRACTIONS), help="comma-separated k/N values")
    p.add_argument("--repeats", type=int, default=3, help="timing repeats (minimum is reported)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random index sets")
    from .bench_server import add_server_arguments

    add_server_arguments(p)
    p.set_defaults(func=run_bench)


def _timeit(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def bench_codecs(n: int = DEFAULT_N, fractions: list[float] | tuple[float, ...] = DEFAULT_FRACTIONS,
                 repeats: int = 3, seed: int = 0, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the codec benchmark; returns the JSON-able result."""
    from ..codecs import available_codecs, codec_of, get_codec, log2_binomial
    from ..codecs import fuse

    t = time.perf_counter()
    jit_s = fuse.warmup()
    log(f"numba JIT / cache load: {jit_s:.2f} s (excluded from every timing below)")
    rng = np.random.default_rng(seed)
    names = available_codecs("indices")
    rows: list[dict[str, Any]] = []
    for frac in fractions:
        k = int(round(n * frac))
        idx = np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)
        truth = np.zeros(n, dtype=bool)
        truth[idx] = True
        bound = log2_binomial(n, k)
        for name in names:
            codec = get_codec(name, "indices")
            enc_s, payload = _timeit(lambda: codec.encode(idx, n), repeats)
            used = codec_of(payload).name
            dec_s, _ = _timeit(lambda: codec.decode(payload), 1 if codec.lossy else repeats)
            mask_s, mask = _timeit(lambda: codec.decode_mask(payload), repeats if codec.lossy else 1)
            if codec.lossy:
                dec_s = mask_s  # a filter's decode is its query-all (+ flatnonzero)
            missed = int(np.count_nonzero(truth & ~mask))
            fp = int(np.count_nonzero(mask & ~truth))
            bits = 8 * len(payload)
            row = {
                "fraction": frac, "n": n, "k": k, "codec": name, "chosen": used, "bytes": len(payload),
                "bits_per_key": bits / k, "bpp": bits / n, "bound_bits_per_key": bound / k,
                "over_bound": bits / bound - 1, "false_negatives": missed, "false_positives": fp,
                "expected_false_positives": codec.expected_false_positives(k, n),
                "encode_s": enc_s, "decode_s": dec_s, "decode_mask_s": mask_s,
            }
            rows.append(row)
            log(f"k/N={frac:<6g} {name:10s} {row['bits_per_key']:7.3f} bits/key  over bound "
                f"{row['over_bound']:+8.2%}  FP {fp:>9d}  enc {enc_s:6.3f} s  dec {dec_s:6.3f} s")
            del mask
        del truth
    # filters at exactly 10^6 keys (bits/key and build-time targets)
    at_1m: list[dict[str, Any]] = []
    k6 = min(1_000_000, n)
    idx6 = np.sort(rng.choice(n, size=k6, replace=False)).astype(np.int64)
    for name in names:
        codec = get_codec(name, "indices")
        if not isinstance(codec, fuse.FuseCodec):
            continue
        enc_s, payload = _timeit(lambda: codec.encode(idx6, n), repeats)
        f, _, _ = codec.filter_of(payload)
        build_s, _ = _timeit(lambda: fuse.build_fuse_filter(idx6, codec.arity, codec.fp_bits, assume_unique=True),
                             repeats)
        q_s, _ = _timeit(lambda: f.query_range(n), repeats)
        at_1m.append({"codec": name, "k": k6, "bits_per_key": 8 * len(payload) / k6,
                      "fingerprint_bits_per_key": 8 * f.nbytes / k6, "encode_s": enc_s, "build_s": build_s,
                      "query_all_s": q_s})
        log(f"10^6 keys {name:10s} {8 * len(payload) / k6:7.3f} bits/key  encode {enc_s:.3f} s  "
            f"build {build_s:.3f} s  query-all {q_s:.3f} s")
    # query backends on one configuration: fuse8, the 1% set if measured, else the first fraction
    backends: list[dict[str, Any]] = []
    frac_b = 0.01 if 0.01 in fractions else fractions[0]
    kb = int(round(n * frac_b))
    f8 = fuse.build_fuse_filter(np.sort(rng.choice(n, size=kb, replace=False)), 3, 8)
    ref = f8.query_range(n, backend="numba")
    np_s, m = _timeit(lambda: f8.query_range(n, backend="numpy"), 1)
    backends.append({"backend": "numpy (CPU)", "n": n, "k": kb, "seconds": np_s, "ns_per_index": 1e9 * np_s / n,
                     "identical": bool(np.array_equal(m, ref))})
    nb_s, _ = _timeit(lambda: f8.query_range(n, backend="numba"), repeats)
    backends.append({"backend": "numba (CPU)", "n": n, "k": kb, "seconds": nb_s, "ns_per_index": 1e9 * nb_s / n,
                     "identical": True})
    try:
        import torch

        slice_n = min(n, 1 << 22)  # torch on CPU is slow here (~0.5 us/index); time a slice
        t_s, tm = _timeit(lambda: f8.query_range_torch(slice_n, "cpu"), 1)
        backends.append({"backend": "torch (CPU, first 2^22 indices)", "n": slice_n, "k": kb, "seconds": t_s,
                         "ns_per_index": 1e9 * t_s / slice_n,
                         "identical": bool(np.array_equal(tm.numpy(), ref[:slice_n]))})
        if torch.cuda.is_available():
            f8.query_range_torch(1 << 20, "cuda")
            torch.cuda.synchronize()

            def _cuda() -> Any:
                out = f8.query_range_torch(n, "cuda", chunk=1 << 26)
                torch.cuda.synchronize()
                return out

            c_s, cm = _timeit(_cuda, repeats)
            backends.append({"backend": f"torch ({torch.cuda.get_device_name(0)})", "n": n, "k": kb,
                             "seconds": c_s, "ns_per_index": 1e9 * c_s / n,
                             "identical": bool(np.array_equal(cm.cpu().numpy(), ref))})
        else:
            backends.append({"backend": "torch (CUDA)", "n": n, "k": kb, "seconds": None,
                             "ns_per_index": None, "identical": None, "note": "no CUDA device on this machine"})
    except ImportError:
        pass
    for b in backends:
        log(f"query-all backend {b['backend']}: {b['seconds']} s")
    dense = _bench_dense(n, fractions, rng, log)
    return {"machine": machine_info(), "jit_warmup_s": jit_s, "n": n, "fractions": list(fractions),
            "repeats": repeats, "seed": seed, "rows": rows, "filters_at_1e6": at_1m, "query_backends": backends,
            "dense": dense, "targets": TARGETS, "wall_s": time.perf_counter() - t}


def _bench_dense(n: int, fractions: Any, rng: np.random.Generator, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Dense baselines (raw and Bernoulli-coded masks) and the downlink codecs, one repeat each."""
    from ..codecs import get_codec

    out: list[dict[str, Any]] = []
    frac = 0.01 if 0.01 in fractions else fractions[0]
    k = int(round(n * frac))
    mask = np.zeros(n, dtype=bool)
    mask[rng.choice(n, size=k, replace=False)] = True
    probs = np.full(n, k / n, dtype=np.float32)
    for name, kw in (("bitpack", {}), ("bernoulli-ans", {"probs": probs})):
        c = get_codec(name, "mask")
        t = time.perf_counter()
        p = c.encode(mask, **kw)
        e = time.perf_counter() - t
        t = time.perf_counter()
        ok = bool(np.array_equal(c.decode(p, **kw), mask))
        d = time.perf_counter() - t
        out.append({"what": f"mask {name} (k/N={frac:g}, probs=k/N)", "bytes": len(p), "bpp": 8 * len(p) / n,
                    "encode_s": e, "decode_s": d, "lossless": ok})
    K = 10
    counts = rng.binomial(K, 0.5, size=n)
    from ..codecs.dense import theta_from_counts

    theta = theta_from_counts(counts, K)
    for name in ("probs-f32", "probs-counts", "probs-q8"):
        c = get_codec(name, "probs")
        t = time.perf_counter()
        p = c.encode(theta, counts=counts, total=K)
        e = time.perf_counter() - t
        t = time.perf_counter()
        th = c.decode(p)
        d = time.perf_counter() - t
        out.append({"what": f"downlink {name} (K={K} clients, counts ~ Bin(K, 1/2))", "bytes": len(p),
                    "bpp": 8 * len(p) / n, "encode_s": e, "decode_s": d,
                    "max_abs_error": float(np.max(np.abs(th - theta)))})
    for r in out:
        log(f"{r['what']}: {r['bpp']:.4f} bpp")
    return out


def markdown(res: dict[str, Any]) -> str:
    """The benchmark as markdown tables."""
    m = res["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cpu_count']} cores (load {m['loadavg_1m']}), Python {m['python']}, "
        f"numpy {m['numpy']}, numba {m.get('numba_version', 'absent')} ({m['numba_threads']} threads), "
        f"torch {m['torch']}, CUDA: {m['cuda'] or 'none'}. Date: {m['date']}. N = {res['n']:,}, "
        f"repeats = {res['repeats']} (minimum reported). numba JIT/cache load {res['jit_warmup_s']:.2f} s, excluded.",
        "",
        "| k/N | codec | bits/key | bpp | bound bits/key | over bound | FP (measured) | FP (expected) | encode s | decode s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        name = r["codec"] if r["codec"] != "auto" else f"auto -> {r['chosen']}"
        lines.append(
            f"| {r['fraction'] * 100:g}% | {name} | {r['bits_per_key']:.3f} | {r['bpp']:.5f} | "
            f"{r['bound_bits_per_key']:.3f} | {r['over_bound'] * 100:+.2f}% | {r['false_positives']:,} | "
            f"{r['expected_false_positives']:,.0f} | {r['encode_s']:.3f} | {r['decode_s']:.3f} |")
    lines += ["", "Filters at exactly 10^6 keys (N as above):", "",
              "| codec | bits/key (container) | bits/key (fingerprints) | encode s | build s | query-all s |",
              "|---|---|---|---|---|---|"]
    for r in res["filters_at_1e6"]:
        lines.append(f"| {r['codec']} | {r['bits_per_key']:.3f} | {r['fingerprint_bits_per_key']:.3f} | "
                     f"{r['encode_s']:.3f} | {r['build_s']:.3f} | {r['query_all_s']:.3f} |")
    lines += ["", "Query-all backends (fuse8):", "", "| backend | indices | keys | seconds | ns/index | identical |",
              "|---|---|---|---|---|---|"]
    for b in res["query_backends"]:
        s = "n/a" if b["seconds"] is None else f"{b['seconds']:.3f}"
        ns = "n/a" if b["ns_per_index"] is None else f"{b['ns_per_index']:.1f}"
        lines.append(f"| {b['backend']} | {b['n']:,} | {b['k']:,} | {s} | {ns} | {b['identical']} |"
                     + (f" {b['note']}" if b.get("note") else ""))
    lines += ["", "Dense baselines and downlink:", "", "| payload | bpp | encode s | decode s | note |", "|---|---|---|---|---|"]
    for d in res["dense"]:
        note = f"lossless={d['lossless']}" if "lossless" in d else f"max abs error {d['max_abs_error']:.2e}"
        lines.append(f"| {d['what']} | {d['bpp']:.4f} | {d['encode_s']:.3f} | {d['decode_s']:.3f} | {note} |")
    return "\n".join(lines) + "\n"


def run_bench(args: argparse.Namespace) -> int:
    """Handler of ``deltamask bench``."""
    if args.target == "server":
        from .bench_server import run_server_bench

        return run_server_bench(args)
    if args.target != "codecs":
        print(f"deltamask bench: unknown target {args.target!r}; valid: codecs, server", file=sys.stderr)
        return 2
    if args.n <= 0 or not args.fractions or any(not 0 < f <= 1 for f in args.fractions):
        print("deltamask bench: --n must be positive and every fraction in (0, 1]", file=sys.stderr)
        return 2
    res = bench_codecs(args.n, args.fractions, args.repeats, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "codecs.json").write_text(json.dumps(res, indent=2))
    (args.out / "codecs.md").write_text(markdown(res))
    print(f"wrote {args.out / 'codecs.json'} and {args.out / 'codecs.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry: ``python -m deltamask.app.bench codecs ...``."""
    parser = argparse.ArgumentParser(prog="deltamask")
    sub = parser.add_subparsers(dest="command", required=True)
    add_bench_parser(sub)
    args = parser.parse_args(["bench", *(argv if argv is not None else sys.argv[1:])])
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
