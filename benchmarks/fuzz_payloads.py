"""Hostile payloads against the receiving side: mutated containers for every registered codec and for
bundles, decoded the way the engines decode (with the receiver's expectation ``expect_n``).

For each case: whether it decoded, raised ``CodecError`` (the only acceptable failure), or raised
anything else (a bug); its time; and its peak allocation beyond the expected output (``tracemalloc``,
which numpy reports to). A decode that succeeds must return a well-formed result: the right type, shape
and dtype, indices strictly increasing inside ``[0, n)`` (as many as the header counts, for exact
codecs), masks of length n whose ones match the header, probabilities in ``[0, 1]``, finite arrays from
the quantizers. Goals (issue 10): 0 untyped exceptions, 0 malformed results, none over 1 s, none over
64 MiB beyond the expected output.

Mutations (each case picks one): bit flips (CRC left stale, or recomputed so the flip reaches the
codec's parser), a header field set to an extreme value (n, count, parameter or payload length, codec
id, flags), the payload truncated or extended with consistent lengths, random parameter bytes, a codec-id
swap, garbage under a valid header, and a bundle (two containers back to back) with one of these applied
to a part.

    python benchmarks/fuzz_payloads.py --cases 100000 [--seed 0] [--json out.json]

tests/codecs/test_codec_fuzz.py runs 10^4 cases of the same generator in CI.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time
import tracemalloc
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deltamask.codecs import CodecError, available_codecs, get_codec
from deltamask.codecs.container import HEADER
from deltamask.codecs.bundle import split_bundle

#: values a mutated header field takes: around 2^8, 2^16, 2^31, 2^32, MAX_N = 2^36 and 2^64
EXTREMES = [0, 1, 2, 3, 255, 256, 65535, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32, (1 << 32) + 1, 1 << 36, (1 << 36) + 1, (1 << 63), (1 << 64) - 1]
FIELDS = {"codec_id": (2, "B"), "flags": (3, "H"), "n": (4, "Q"), "count": (5, "Q"), "params_len": (6, "I"), "payload_len": (7, "Q")}
RAW_ARRAYS = {"f32", "f16", "i64"}
MIB = 1 << 20


def sample(name: str, rng: np.random.Generator) -> tuple[bytes, int, dict[str, Any]]:
    """A valid payload of codec ``name``: (bytes, expected n, decode arguments)."""
    codec = get_codec(name)
    n = int(rng.integers(1, 3000))
    if codec.kind == "indices":
        k = int(rng.integers(0, min(n, 200) + 1))
        return codec.encode(np.sort(rng.choice(n, k, replace=False)), n, int(rng.integers(0, 100))), n, {}
    if codec.kind == "mask":
        probs = rng.uniform(0.02, 0.98, n).astype(np.float32)
        return codec.encode(rng.random(n) < probs, probs), n, {"probs": probs}
    if codec.kind == "array":
        if name == "i64":
            a = rng.integers(-1000, 1000, int(rng.integers(1, 20)))
            return codec.encode(a), a.size, {}
        a = rng.standard_normal(n).astype(np.float32)
        return codec.encode(a), n, {}
    if codec.kind == "delta":
        return _delta_sample(codec, n, rng), n, {}
    from deltamask.codecs.dense import theta_from_counts

    total = int(rng.integers(1, 12))
    counts = rng.binomial(total, 0.4, n)
    return codec.encode(theta_from_counts(counts, total), counts, total), n, {}


def _delta_sample(codec: Any, n: int, rng: np.random.Generator) -> bytes:
    """A theta-delta message of a random mode: same, cond (counts or q8 levels) or replay (index sets)."""
    base, target = rng.bytes(16), rng.bytes(16)
    mode = ("same", "cond", "cond-q8", "replay")[int(rng.integers(0, 4))]
    if mode == "same":
        return codec.encode_same(n, target)
    if mode == "replay":
        from deltamask.codecs import get_codec

        golomb = get_codec("golomb")
        rounds = [(int(r), [golomb.encode(np.sort(rng.choice(n, min(n, 5), replace=False)), n) for _ in range(int(rng.integers(0, 3)))])
                  for r in range(1, int(rng.integers(1, 4)))]
        return codec.encode_replay(n, rounds, base, target)
    if mode == "cond-q8":
        old = rng.integers(0, 256, n)
        return codec.encode_cond(np.clip(old + rng.integers(-2, 3, n), 0, 255), old, "q8", 255, 255, "mode", 0.01, (1.0, 1.0), base, target)
    tv, tt = int(rng.integers(1, 12)), int(rng.integers(1, 12))
    return codec.encode_cond(rng.binomial(tt, 0.4, n), rng.binomial(tv, 0.4, n), "counts", tt, tv, "mode", 0.01, (1.0, 1.0), base, target)


def _recrc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def _set_field(data: bytes, fld: str, value: int) -> bytes | None:
    idx, fmt = FIELDS[fld]
    fields = list(HEADER.unpack_from(data, 0))
    limit = 1 << (8 * struct.calcsize("<" + fmt))
    if not 0 <= value < limit:
        return None
    fields[idx] = value
    return _recrc(HEADER.pack(*fields) + data[HEADER.size:-4])


def _with_body(data: bytes, params: bytes | None = None, payload: bytes | None = None) -> bytes:
    f = list(HEADER.unpack_from(data, 0))
    old_params = data[HEADER.size:HEADER.size + f[6]]
    old_payload = data[HEADER.size + f[6]:-4]
    params = old_params if params is None else params
    payload = old_payload if payload is None else payload
    f[6], f[7] = len(params), len(payload)
    return _recrc(HEADER.pack(*f) + params + payload)


def mutate(data: bytes, rng: np.random.Generator, ids: list[int]) -> tuple[str, bytes]:
    """One mutation of a container: (what was done, the new bytes)."""
    kind = ["flip", "flip-crc", "field", "truncate", "extend", "params", "codec-id", "garbage"][int(rng.integers(0, 8))]
    buf = bytearray(data)
    if kind in ("flip", "flip-crc"):
        body_len = len(buf) - (4 if kind == "flip-crc" else 0)
        for _ in range(int(rng.integers(1, 5))):
            i = int(rng.integers(0, body_len))
            buf[i] ^= 1 << int(rng.integers(0, 8))
        out = bytes(buf) if kind == "flip" else _recrc(bytes(buf[:-4]))
        return kind, out
    if kind == "field":
        fld = list(FIELDS)[int(rng.integers(0, len(FIELDS)))]
        for _ in range(8):
            value = EXTREMES[int(rng.integers(0, len(EXTREMES)))] if rng.random() < 0.7 else int(rng.integers(0, 1 << 40))
            out = _set_field(data, fld, value)
            if out is not None:
                return f"field:{fld}", out
        return "field", data
    f = HEADER.unpack_from(data, 0)
    payload = data[HEADER.size + f[6]:-4]
    if kind == "truncate":
        cut = int(rng.integers(1, max(2, len(payload) + 1)))
        return kind, _with_body(data, payload=payload[:max(0, len(payload) - cut)])
    if kind == "extend":
        extra = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
        return kind, _with_body(data, payload=payload + extra)
    if kind == "params":
        return kind, _with_body(data, params=rng.integers(0, 256, int(rng.integers(0, 64)), dtype=np.uint8).tobytes())
    if kind == "codec-id":
        return kind, _set_field(data, "codec_id", ids[int(rng.integers(0, len(ids)))]) or data
    garbage = rng.integers(0, 256, int(rng.integers(0, 400)), dtype=np.uint8).tobytes()
    out = _with_body(data, params=garbage[: int(rng.integers(0, 40))], payload=garbage)
    if rng.random() < 0.5:
        out = _set_field(out, "count", int(rng.integers(0, 1 << 33))) or out
    return kind, out


def check_result(name: str, out: Any, n: int, data: bytes, how: str) -> str | None:
    """Why a successful decode's result is malformed (None when it is well-formed)."""
    codec = get_codec(name)
    header_count = HEADER.unpack_from(data, 0)[5] if len(data) >= HEADER.size else None
    if codec.kind != "delta" and not isinstance(out, np.ndarray):
        return f"returned {type(out).__name__}"
    if how == "decode_mask" or codec.kind == "mask":
        if out.dtype != bool or out.shape != (n,):
            return f"mask {out.dtype} {out.shape}, expected bool ({n},)"
        if codec.kind == "mask" and int(out.sum()) != header_count:
            return f"mask has {int(out.sum())} ones, header says {header_count}"
        return None
    if codec.kind == "indices":
        if out.ndim != 1 or out.dtype != np.int64:
            return f"indices {out.dtype} {out.shape}"
        if out.size and (out[0] < 0 or out[-1] >= n or not bool(np.all(out[1:] > out[:-1]))):
            return "indices not strictly increasing inside [0, n)"
        if not codec.lossy and name != "auto" and out.size != header_count:
            return f"{out.size} indices, header says {header_count}"
        return None
    if codec.kind == "delta":
        from deltamask.codecs.delta import DeltaMessage

        if not isinstance(out, DeltaMessage) or out.n != n:
            return f"delta decode returned {type(out).__name__} for n={n}"
        if out.mode == "cond" and sum(g[1] for g in out.groups) != n:
            return "cond groups do not cover n"
        return None
    if not isinstance(out, np.ndarray):
        return f"returned {type(out).__name__}"
    if codec.kind == "probs":
        if out.shape != (n,) or not np.issubdtype(out.dtype, np.floating):
            return f"probs {out.dtype} {out.shape}"
        if out.size and not (np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1):
            return "probabilities outside [0, 1]"
        return None
    if out.size != n:
        return f"array of {out.size} elements, expected {n}"
    if name not in RAW_ARRAYS and np.issubdtype(out.dtype, np.floating) and not np.isfinite(out).all():
        return "non-finite values from a quantizer"
    return None


def receive(name: str, data: bytes, n: int, args: dict[str, Any]) -> list[tuple[str, Any]]:
    """Decode as the engines do; returns [(function, result)]."""
    codec = get_codec(name)
    if codec.kind == "indices":
        return [("decode", codec.decode(data, expect_n=n)), ("decode_mask", codec.decode_mask(data, expect_n=n))]
    if codec.kind == "mask":
        return [("decode", codec.decode(data, args.get("probs"), expect_n=n))]
    return [("decode", codec.decode(data, expect_n=n))]


@dataclass
class Report:
    cases: int = 0
    outcomes: Counter = field(default_factory=Counter)
    by_mutation: dict[str, Counter] = field(default_factory=dict)
    untyped: list[str] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)
    slowest: tuple[float, str] = (0.0, "")
    largest_extra: tuple[int, str] = (0, "")
    over_1s: int = 0
    over_64mib: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "cases": self.cases, "outcomes": dict(self.outcomes), "untyped": len(self.untyped), "malformed": len(self.malformed),
            "untyped_examples": self.untyped[:10], "malformed_examples": self.malformed[:10],
            "slowest_s": round(self.slowest[0], 4), "slowest_case": self.slowest[1],
            "largest_extra_MiB": round(self.largest_extra[0] / MIB, 2), "largest_extra_case": self.largest_extra[1],
            "over_1s": self.over_1s, "over_64MiB": self.over_64mib,
            "by_mutation": {k: dict(v) for k, v in sorted(self.by_mutation.items())},
        }


def run(cases: int, seed: int = 0, progress: bool = False) -> Report:
    rng = np.random.default_rng(seed)
    names = available_codecs()
    ids = sorted({get_codec(n).codec_id for n in names})
    rep = Report()
    pool = [(name, *sample(name, rng)) for name in names for _ in range(4)]
    tracemalloc.start()
    t_start = time.time()
    for i in range(cases):
        name, data, n, args = pool[int(rng.integers(0, len(pool)))]
        bundle = rng.random() < 0.1
        how, mutated = mutate(data, rng, ids)
        label = f"{name}/{how}" + ("/bundle" if bundle else "")
        if bundle:  # a bundle of two containers, one of them mutated: split, then decode each part
            other = pool[int(rng.integers(0, len(pool)))]
            blob = mutated + other[1] if rng.random() < 0.5 else other[1] + mutated
        expected_out = 8 * n + 1024
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        t0 = time.perf_counter()
        try:
            if bundle:
                parts = split_bundle(blob)
                results = []
                for part in parts:
                    pname, pn, pargs = (name, n, args) if part == mutated else (other[0], other[2], other[3])
                    results += [(f"{pname}.{h}", r, pname, pn, part) for h, r in receive(pname, part, pn, pargs)]
            else:
                results = [(h, r, name, n, mutated) for h, r in receive(name, mutated, n, args)]
            outcome = "decoded"
            for h, r, rname, rn, rdata in results:
                why = check_result(rname, r, rn, rdata, h.rsplit(".", 1)[-1])
                if why:
                    outcome = "malformed"
                    rep.malformed.append(f"{label} {h}: {why}")
                    break
        except CodecError:
            outcome = "CodecError"
        except Exception as e:  # noqa: BLE001 - this is what the fuzzer looks for
            outcome = "untyped"
            rep.untyped.append(f"{label}: {type(e).__name__}: {e}")
        dt = time.perf_counter() - t0
        extra = tracemalloc.get_traced_memory()[1] - base - expected_out
        rep.cases += 1
        rep.outcomes[outcome] += 1
        rep.by_mutation.setdefault(how.split(":")[0], Counter())[outcome] += 1
        if dt > rep.slowest[0]:
            rep.slowest = (dt, label)
        if extra > rep.largest_extra[0]:
            rep.largest_extra = (extra, label)
        rep.over_1s += dt > 1.0
        rep.over_64mib += extra > 64 * MIB
        if progress and (i + 1) % 10000 == 0:
            print(f"{i + 1} cases, {time.time() - t_start:.0f} s: {dict(rep.outcomes)}", file=sys.stderr, flush=True)
    tracemalloc.stop()
    return rep


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the report here")
    a = ap.parse_args()
    t0 = time.time()
    rep = run(a.cases, a.seed, progress=True)
    out = rep.as_dict()
    out["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(out, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    bad = out["untyped"] or out["malformed"] or out["over_1s"] or out["over_64MiB"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
