"""``deltamask bench server``: the server at foundation-model scale (issue 13), measured.

    deltamask bench server [--out DIR] [--sizes 86000000,300000000] [--clients 10,100]
                           [--densities 0.001,0.004,0.02] [--reference 86000000:10:0.004] [--codec ans]

For every (N, K, density) it builds a synthetic round in a fresh process: a global ``theta_g`` (60% of
the weights kept by the reference ``[theta_g >= 0.5]``), K client payloads (each a uniformly random
index set of ``density * N`` flipped weights, encoded with ``--codec``, default ``ans``, DeltaMask's
``auto`` choice at these densities) and the default server mode (priors reset every round,
unweighted, posterior mode, exact counts downlink). It then times, on that one process:

* ``decode + aggregate`` per client: payload decode and :meth:`MaskAggregator.add_flips`;
* ``finish``: the O(N) once-per-round work (counts, theta by table look-up);
* ``downlink encode`` (server) and ``downlink decode`` (a client, to float32 theta), with
  ``probs-counts-rans`` (what ``auto`` sends) and, for comparison, constriction's ``probs-counts``;
* peak RSS of the server phase (``/proc/self/status`` VmHWM, reset before it) and the extra a
  client's downlink decode adds, in bytes and bytes per masked weight;
* the memory-bandwidth floor of the same process: one in-place float32 pass over N (``a += 1``,
  8 bytes of traffic per weight), and every time above as a multiple of it.

Every phase runs twice and the faster is reported: the first touch of fresh memory costs ~2 ns/byte
on the VM this was written on (page faults), which a long-running server pays once.

``--reference N:K:density`` (repeatable; ``none`` to skip) also runs the server as it was before
issue 13 on the same payloads, in its own process: every payload expanded to a dense N mask, XORed with
the reference and added into float32 alpha/beta and int32 counts, posterior in float64, the counts
downlink encoded from int64 and decoded through float64 (the server decoding its own payload). It
checks that both give the same theta, bit for bit. Writes ``server.json`` and ``server.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_SIZES = (86_000_000, 300_000_000)
DEFAULT_CLIENTS = (10, 100)
DEFAULT_DENSITIES = (0.001, 0.004, 0.02)
DEFAULT_REFERENCE = ((86_000_000, 10, 0.004),)
#: Issue 13's goals at N = 86M, K = 10, 0.4% on the 2-core CPU machine.
GOALS = {"decode_aggregate_s_per_client": 0.1, "downlink_decode_s": 1.0, "server_peak_gb": 2.0,
         "server_bytes_per_weight": 16.0}
STAT, EPS = "mode", 0.01


# --- process-level measurements -------------------------------------------------------------------------

def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return -1


def reset_peak() -> None:
    """Reset the peak-RSS counter (VmHWM) of this process (Linux >= 4.0)."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_bytes() -> int:
    return 1024 * _status_kb("VmHWM")


def rss_bytes() -> int:
    return 1024 * _status_kb("VmRSS")


def _best(fn: Callable[[], Any], repeats: int = 2) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeats):
        out = None
        gc.collect()
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def bandwidth_floor(n: int) -> dict[str, float]:
    """One in-place float32 pass over n elements (read + write, 8 bytes per element), warm."""
    a = np.zeros(n, dtype=np.float32)
    a += 1  # first touch
    s, _ = _best(lambda: np.add(a, np.float32(1), out=a), 3)
    return {"floor_s": s, "floor_gb_per_s": 8 * n / s / 1e9}


# --- synthetic round --------------------------------------------------------------------------------------

def random_index_set(rng: np.random.Generator, n: int, density: float) -> np.ndarray:
    """Sorted distinct indices, each of [0, n) present with probability ``density`` (geometric gaps, O(k))."""
    k = int(n * density)
    out: list[np.ndarray] = []
    last = -1
    while last < n:
        gaps = rng.geometric(density, size=max(1024, int(1.05 * (k - sum(o.size for o in out))) + 1024))
        pos = last + np.cumsum(gaps)
        out.append(pos[pos < n])
        last = int(pos[-1])
    return np.concatenate(out).astype(np.int64)


def synthetic_round(n: int, clients: int, density: float, codec_name: str, seed: int) -> tuple[np.ndarray, list[bytes], int]:
    """(theta_g, client payloads, total keys) for one synthetic round."""
    from ..codecs import get_codec

    rng = np.random.default_rng(seed)
    theta = np.empty(n, dtype=np.float32)
    for lo in range(0, n, 1 << 22):  # 60% of weights kept by the reference, values away from 0.5
        hi = min(n, lo + (1 << 22))
        u = rng.random(hi - lo, dtype=np.float32)
        theta[lo:hi] = np.where(u < 0.6, np.float32(0.9), np.float32(0.1))
    codec = get_codec(codec_name, "indices")
    payloads, keys = [], 0
    for c in range(clients):
        idx = random_index_set(rng, n, density)
        keys += idx.size
        payloads.append(codec.encode(idx, n, seed=c))
    return theta, payloads, keys


# --- the server as it is ----------------------------------------------------------------------------------

def run_case(n: int, clients: int, density: float, codec_name: str = "ans", seed: int = 0,
             device: str | None = None) -> dict[str, Any]:
    """Time one (N, K, density) round on the current server path (run it in a fresh process)."""
    from ..codecs import codec_of, rans
    from ..codecs.dense import ProbsCountsCodec
    from ..fl.aggregation import MaskAggregator, init_state

    rans.warmup()  # numba compile / cache load, outside every timing
    base_rss = rss_bytes()
    floor = bandwidth_floor(n)
    t = time.perf_counter()
    theta_g, payloads, keys = synthetic_round(n, clients, density, codec_name, seed)
    gen_s = time.perf_counter() - t
    state = init_state(n, 0.5, np.zeros((2, 2), np.float32), np.zeros(2, np.float32), posterior_params=False)
    state.theta = theta_g
    down = rans.ProbsCountsRansCodec(STAT, EPS)  # the auto downlink when theta is a function of counts
    payload_bytes = sum(len(p) for p in payloads)
    rounds: list[dict[str, float]] = []
    theta_new = counts = None
    for _ in range(2):  # the first round pays the first touch of fresh memory; report both
        theta_new = counts = None
        reset_peak()
        rss0 = rss_bytes()
        t0 = time.perf_counter()
        agg = MaskAggregator(state, 1, 1, False, device=device)
        for p in payloads:
            agg.add_flips(codec_of(p).decode(p))
        t1 = time.perf_counter()
        counts = agg.counts()
        theta_new = down.reconstruct(None, counts, agg.total)
        del agg
        t2 = time.perf_counter()
        dl = down.encode(theta_new, counts, clients)
        t3 = time.perf_counter()
        server_peak = peak_bytes()
        rounds.append({"decode_aggregate_s": t1 - t0, "finish_s": t2 - t1, "downlink_encode_s": t3 - t2,
                       "server_peak_bytes": server_peak, "server_rss_before_bytes": rss0})
    client: list[dict[str, float]] = []
    ok = True
    for _ in range(2):
        reset_peak()
        rss0 = rss_bytes()
        t0 = time.perf_counter()
        got = rans.ProbsCountsRansCodec().decode(dl)
        s = time.perf_counter() - t0
        client.append({"downlink_decode_s": s, "client_extra_bytes": peak_bytes() - rss0})
        ok = ok and bool(np.array_equal(got.view(np.uint32), theta_new.view(np.uint32)))
        del got
    # the same counts through constriction's ANS (probs-counts), streamed: for comparison
    slow = ProbsCountsCodec(STAT, EPS)
    slow_enc_s, slow_dl = _best(lambda: slow.encode(None, counts, clients), 1)
    slow_dec_s, _ = _best(lambda: slow.decode(slow_dl), 2)
    best = {k: min(r[k] for r in rounds) for k in ("decode_aggregate_s", "finish_s", "downlink_encode_s")}
    best.update({k: min(c[k] for c in client) for k in ("downlink_decode_s",)})
    # Peak of the server phase above the process's resting RSS before the payloads existed: the
    # server's own arrays (theta, reference, flip counter, counts, new theta, downlink) plus payloads.
    peak = max(r["server_peak_bytes"] for r in rounds)
    out = {
        "n": n, "clients": clients, "density": density, "codec": codec_name, "device": device or "numpy",
        "keys_per_client": keys / clients, "uplink_bpp": 8 * payload_bytes / clients / n,
        "downlink_bpp": 8 * len(dl) / n, "downlink_codec": down.name, "generate_s": gen_s, **floor,
        "probs_counts_constriction": {"bpp": 8 * len(slow_dl) / n, "encode_s": slow_enc_s, "decode_s": slow_dec_s},
        "decode_aggregate_s_per_client": best["decode_aggregate_s"] / clients,
        "finish_s": best["finish_s"], "round_s": best["decode_aggregate_s"] + best["finish_s"],
        "downlink_encode_s": best["downlink_encode_s"], "downlink_decode_s": best["downlink_decode_s"],
        "server_peak_bytes": peak, "process_base_bytes": base_rss,
        "server_bytes_per_weight": (peak - base_rss) / n,
        "client_decode_extra_bytes_per_weight": min(c["client_extra_bytes"] for c in client) / n,
        "first_round": rounds[0], "client_decode_runs": client, "downlink_roundtrip_identical": ok,
        "theta_sha": _digest(theta_new),
    }
    for k in ("decode_aggregate_s_per_client", "finish_s", "downlink_encode_s", "downlink_decode_s"):
        out[k.replace("_s", "") + "_x_floor"] = out[k] / floor["floor_s"]
    return out


def _digest(a: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(a).view(np.uint8)).hexdigest()[:16]


# --- the server as it was (the reference, before issue 13) -----------------------------------------------

def _old_theta_from_counts(counts: np.ndarray, total: int, stat: str, eps: float) -> np.ndarray:
    c = counts.astype(np.float64)
    th = (1.0 + c) / (2.0 + total) if stat == "mean" else c / float(total)
    return np.clip(th, eps, 1.0 - eps).astype(np.float32)


def _old_posterior(alpha: np.ndarray, beta: np.ndarray, stat: str, eps: float) -> np.ndarray:
    a = alpha.astype(np.float64)
    b = beta.astype(np.float64)
    if stat == "mean":
        th = a / (a + b)
    else:
        denom = a + b - 2.0
        safe = np.where(denom > 0, denom, 1.0)
        th = np.where(denom > 0, (a - 1.0) / safe, 0.5)
    return np.clip(th, eps, 1.0 - eps).astype(np.float32)


def _old_encode(counts: np.ndarray, total: int, stat: str, eps: float) -> bytes:
    import constriction

    from ..codecs.container import pack
    from ..codecs.dense import _COUNTS_PARAMS, _STAT_IDS, ProbsCountsCodec

    c = np.asarray(counts).astype(np.int64).ravel()
    if c.size and (c.min() < 0 or c.max() > total):
        raise ValueError("counts out of range")
    hist = np.bincount(c, minlength=total + 1).astype(np.uint32)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(c.astype(np.int32), constriction.stream.model.Categorical(hist / hist.sum(), perfect=False))
    body = coder.get_compressed().astype("<u4").tobytes()
    params = _COUNTS_PARAMS.pack(total, _STAT_IDS[stat], eps, 1.0, 1.0) + hist.astype("<u4").tobytes()
    return pack(ProbsCountsCodec.codec_id, c.size, c.size, body, params)


def _old_decode(data: bytes) -> np.ndarray:
    import constriction

    from ..codecs.container import unpack
    from ..codecs.dense import _COUNTS_PARAMS

    c = unpack(data)
    total, stat_id, eps, _, _ = _COUNTS_PARAMS.unpack_from(c.params)
    hist = np.frombuffer(c.params[_COUNTS_PARAMS.size :], dtype="<u4").astype(np.int64)
    words = np.frombuffer(c.payload, dtype="<u4").astype(np.uint32)
    coder = constriction.stream.stack.AnsCoder(words)
    model = constriction.stream.model.Categorical(hist / hist.sum(), perfect=False)
    counts = np.asarray(coder.decode(model, c.n), dtype=np.int64)
    if np.bincount(counts, minlength=hist.size)[: hist.size].tolist() != hist.tolist():
        raise ValueError("corrupted")
    return _old_theta_from_counts(counts, total, "mean" if stat_id == 0 else "mode", eps)


def run_reference_case(n: int, clients: int, density: float, codec_name: str = "ans", seed: int = 0) -> dict[str, Any]:
    """The pre-issue-13 server on the same synthetic round (dense per client)."""
    from ..codecs import codec_of

    base_rss = rss_bytes()
    floor = bandwidth_floor(n)
    theta_g, payloads, _ = synthetic_round(n, clients, density, codec_name, seed)
    rounds = []
    theta = dl = None
    for _ in range(2):
        theta = dl = None
        reset_peak()
        t0 = time.perf_counter()
        r = theta_g >= 0.5
        alpha = np.ones(n, dtype=np.float32)
        beta = np.ones(n, dtype=np.float32)
        counts = np.zeros(n, dtype=np.int32)
        for p in payloads:
            member = codec_of(p).decode_mask(p)
            m = r ^ member
            alpha += m
            beta += ~m
            counts += m
            del member, m
        t1 = time.perf_counter()
        _old_posterior(alpha, beta, STAT, EPS)
        dl = _old_encode(counts, clients, STAT, EPS)
        t2 = time.perf_counter()
        theta = _old_decode(dl)  # the server adopted the clients' view by decoding its own payload
        t3 = time.perf_counter()
        rounds.append({"decode_aggregate_s": t1 - t0, "posterior_and_downlink_encode_s": t2 - t1,
                       "server_redecode_s": t3 - t2, "server_peak_bytes": peak_bytes()})
        del alpha, beta, counts, r
    client = []
    for _ in range(2):
        reset_peak()
        rss0 = rss_bytes()
        s, _ = _best(lambda: _old_decode(dl), 1)
        client.append({"downlink_decode_s": s, "client_extra_bytes": peak_bytes() - rss0})
    peak = max(x["server_peak_bytes"] for x in rounds)
    best = {k: min(x[k] for x in rounds) for k in rounds[0] if k.endswith("_s")}
    return {
        "n": n, "clients": clients, "density": density, "codec": codec_name, "path": "dense (before issue 13)",
        **floor,
        "decode_aggregate_s_per_client": best["decode_aggregate_s"] / clients,
        "finish_s": best["posterior_and_downlink_encode_s"] + best["server_redecode_s"],
        "downlink_encode_s": best["posterior_and_downlink_encode_s"],
        "downlink_decode_s": min(c["downlink_decode_s"] for c in client),
        "server_peak_bytes": peak, "process_base_bytes": base_rss, "server_bytes_per_weight": (peak - base_rss) / n,
        "client_decode_extra_bytes_per_weight": min(c["client_extra_bytes"] for c in client) / n,
        "first_round": rounds[0], "theta_sha": _digest(theta),
    }


# --- driver -----------------------------------------------------------------------------------------------

def _in_subprocess(fn: str, kwargs: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    code = ("import json, sys; from deltamask.app import bench_server as b; "
            f"print('@@' + json.dumps(b.{fn}(**json.loads(sys.argv[1]))))")
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True, env=env,
                          check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@")]
    if proc.returncode != 0 or not lines:
        msg = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        log(f"  case {kwargs} failed (exit {proc.returncode}): {msg}")
        return {**kwargs, "error": f"exit {proc.returncode}: {msg}"}
    return json.loads(lines[-1][2:])


def bench_server(sizes: list[int], clients: list[int], densities: list[float],
                 reference: list[tuple[int, int, float]], codec: str = "ans", seed: int = 0,
                 device: str | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    from .machine import machine_info

    t = time.perf_counter()
    load_start = os.getloadavg()[0]
    rows, refs = [], []
    for n in sizes:
        for k in clients:
            for d in densities:
                log(f"N={n:,} K={k} density={d:g} ...")
                row = _in_subprocess("run_case", {"n": n, "clients": k, "density": d, "codec_name": codec, "seed": seed,
                                                      "device": device}, log)
                rows.append(row)
                if "error" not in row:
                    log(f"  decode+aggregate {row['decode_aggregate_s_per_client']:.4f} s/client, finish "
                        f"{row['finish_s']:.3f} s, downlink enc {row['downlink_encode_s']:.3f} s dec "
                        f"{row['downlink_decode_s']:.3f} s, server peak {row['server_peak_bytes'] / 1e9:.2f} GB "
                        f"({row['server_bytes_per_weight']:.1f} B/weight), floor {row['floor_s']:.4f} s")
    for n, k, d in reference:
        log(f"reference (dense, before issue 13) N={n:,} K={k} density={d:g} ...")
        ref = _in_subprocess("run_reference_case", {"n": n, "clients": k, "density": d, "codec_name": codec,
                                                         "seed": seed}, log)
        same = [r for r in rows if (r.get("n"), r.get("clients"), r.get("density")) == (n, k, d) and "error" not in r]
        if same and "error" not in ref:
            ref["theta_identical_to_sparse"] = ref["theta_sha"] == same[0]["theta_sha"]
        refs.append(ref)
        if "error" not in ref:
            log(f"  decode+aggregate {ref['decode_aggregate_s_per_client']:.4f} s/client, downlink dec "
                f"{ref['downlink_decode_s']:.3f} s, server peak {ref['server_peak_bytes'] / 1e9:.2f} GB")
    return {"machine": {**machine_info(), "loadavg_1m_start": load_start}, "codec": codec, "seed": seed, "stat": STAT, "eps": EPS, "rows": rows,
            "reference": refs, "goals": GOALS, "wall_s": time.perf_counter() - t}


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [
        (f"Machine: {m['cpu']}, {m['cpu_count']} cores (load {m.get('loadavg_1m_start', 0):.1f} at the start, "
         f"{m['loadavg_1m']:.1f} at the end), Python {m['python']}, numpy "
         f"{m['numpy']}, torch {m['torch']}, CUDA: {m['cuda'] or 'none'}. Date: {m['date']}. Uplink codec "
         f"{res['codec']}; default server mode (reset every round, unweighted, posterior {res['stat']}, counts "
         "downlink). Each phase run twice in one process, the faster reported. Floor = one in-place float32 pass "
         "over N in the same process."),
        "",
        ("| N | K | density | path | decode+aggregate s/client | x floor | finish s | downlink enc s | downlink dec s "
         "| x floor | server peak GB | B/weight | client decode B/weight | floor s |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def row(r: dict[str, Any], path: str) -> str:
        if "error" in r:
            return f"| {r['n']:,} | {r['clients']} | {r['density'] * 100:g}% | {path} | failed: {r['error']} |"
        fl = r["floor_s"]
        return (f"| {r['n']:,} | {r['clients']} | {r['density'] * 100:g}% | {path} | "
                f"{r['decode_aggregate_s_per_client']:.4f} | {r['decode_aggregate_s_per_client'] / fl:.2f} | "
                f"{r['finish_s']:.3f} | {r['downlink_encode_s']:.3f} | {r['downlink_decode_s']:.3f} | "
                f"{r['downlink_decode_s'] / fl:.1f} | {r['server_peak_bytes'] / 1e9:.2f} | "
                f"{r['server_bytes_per_weight']:.1f} | {r['client_decode_extra_bytes_per_weight']:.1f} | {fl:.4f} |")

    for r in res["reference"]:
        lines.append(row(r, "dense (before)"))
        for s in res["rows"]:
            if (s.get("n"), s.get("clients"), s.get("density")) == (r["n"], r["clients"], r["density"]):
                lines.append(row(s, "sparse (now)"))
    for s in res["rows"]:
        lines.append(row(s, "sparse"))
    for r in res["reference"]:
        if "theta_identical_to_sparse" in r:
            lines += ["", (f"Reference N={r['n']:,} K={r['clients']} {r['density'] * 100:g}%: theta identical to "
                           f"the sparse path: {r['theta_identical_to_sparse']}.")]
    bad = [s for s in res["rows"] if "error" not in s and not s.get("downlink_roundtrip_identical", True)]
    lines += ["", f"Downlink decode equals the server's theta bit for bit in every case: {not bad}."]
    return "\n".join(lines) + "\n"


def _case_list(text: str) -> list[tuple[int, int, float]]:
    if text.strip().lower() in ("", "none"):
        return []
    out = []
    for part in text.split(","):
        n, k, d = part.split(":")
        out.append((int(float(n)), int(k), float(d)))
    return out


def add_server_arguments(p: argparse.ArgumentParser) -> None:
    ints = lambda s: [int(float(x)) for x in s.split(",") if x]
    floats = lambda s: [float(x) for x in s.split(",") if x]
    p.add_argument("--sizes", type=ints, default=list(DEFAULT_SIZES), help="server: comma-separated N values")
    p.add_argument("--clients", type=ints, default=list(DEFAULT_CLIENTS), help="server: comma-separated K values")
    p.add_argument("--densities", type=floats, default=list(DEFAULT_DENSITIES),
                   help="server: comma-separated k/N values per client")
    p.add_argument("--reference", type=_case_list, default=list(DEFAULT_REFERENCE),
                   help="server: N:K:density cases (comma-separated) also run on the old dense path; none = skip")
    p.add_argument("--codec", default="ans", help="server: uplink index codec of the synthetic payloads")
    p.add_argument("--device", default=None, help="server: aggregate on this torch device (default numpy)")


def run_server_bench(args: argparse.Namespace) -> int:
    if (not args.sizes or not args.clients or not args.densities or any(n <= 0 for n in args.sizes)
            or any(k <= 0 for k in args.clients) or any(not 0 < d < 1 for d in args.densities)):
        print("deltamask bench server: --sizes and --clients must be positive, --densities in (0, 1)", file=sys.stderr)
        return 2
    res = bench_server(args.sizes, args.clients, args.densities, args.reference, args.codec, args.seed, args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "server.json").write_text(json.dumps(res, indent=2))
    (args.out / "server.md").write_text(markdown(res))
    print(f"wrote {args.out / 'server.json'} and {args.out / 'server.md'}")
    return 0
