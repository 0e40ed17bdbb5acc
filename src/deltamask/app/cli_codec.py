"""``deltamask codec``: encode, decode and inspect payloads from the command line (black-box use).

    deltamask codec encode --codec NAME --n N --indices IN.npy -o OUT.bin [--seed S]
                           [--max-false-positives X [--per-key]]          (auto's budget)
    deltamask codec decode IN.bin -o OUT.npy [--probs P.npy]   (index codecs: the decoded index set;
                           for a filter every member of [0, N), false positives included; IN may be
                           a filter PNG written by ``inspect --png``)
    deltamask codec inspect IN.bin [--png OUT.png]     (JSON: header, sizes, bits per key, bound)
    deltamask codec list

Wire it into the main CLI with ``add_codec_parser(subparsers)``; the handler is set as ``func``.
A malformed, truncated or corrupted payload exits with status 1 and one line on stderr naming the
problem (no traceback); usage errors exit with argparse's status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def add_codec_parser(subparsers: Any) -> None:
    """Register the ``codec`` sub-command (with encode / decode / inspect / list) on ``subparsers``."""
    p = subparsers.add_parser("codec", help="encode, decode and inspect codec payloads",
                              description="Encode, decode and inspect deltamask codec payloads.")
    p.set_defaults(func=run_codec, codec_cmd=None, _codec_parser=p)
    sub = p.add_subparsers(dest="codec_cmd", metavar="{encode,decode,inspect,list}")

    e = sub.add_parser("encode", help="encode a sorted index set (.npy of integers)")
    e.add_argument("--codec", required=True, help="index codec name (see `deltamask codec list`)")
    e.add_argument("--n", required=True, type=int, help="universe size N (indices lie in [0, N))")
    e.add_argument("--indices", required=True, type=Path, help="input .npy with a 1-D integer array")
    e.add_argument("-o", "--output", required=True, type=Path, help="output payload file")
    e.add_argument("--seed", type=int, default=0, help="filter seed (default 0)")
    e.add_argument("--max-false-positives", type=float, default=0.0,
                   help="auto only: expected false positives allowed (default 0 = exact codecs only)")
    e.add_argument("--per-key", action="store_true", help="auto only: the budget is per encoded key")

    d = sub.add_parser("decode", help="decode a payload to .npy")
    d.add_argument("input", type=Path, help="payload file (or a filter PNG)")
    d.add_argument("-o", "--output", required=True, type=Path, help="output .npy")
    d.add_argument("--probs", type=Path, help="shared probabilities (.npy) for codecs that need them")
    d.add_argument("--expect-n", type=int, help="the universe size / element count you expect; a payload claiming another is refused")
    d.add_argument("--max-n", type=int, default=1 << 32,
                   help="refuse a payload whose header claims more than this many elements, before decoding (default 2^32)")

    i = sub.add_parser("inspect", help="print a payload's header, sizes and bits per key as JSON")
    i.add_argument("input", type=Path, help="payload file (or a filter PNG)")
    i.add_argument("--png", type=Path, help="also write a filter's fingerprints as a grayscale PNG here")

    sub.add_parser("list", help="list registered codecs")


def _read_payload(path: Path) -> bytes:
    data = path.read_bytes()
    if data.startswith(PNG_MAGIC):
        from ..codecs.image import png_to_payload

        return png_to_payload(data)
    return data


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path}: not a readable .npy file ({e})") from None


def _encode(args: argparse.Namespace) -> int:
    from ..codecs import get_codec
    from ..codecs.auto import AutoCodec

    if args.codec == "auto":
        codec = AutoCodec(args.max_false_positives, per_key=args.per_key)
    else:
        codec = get_codec(args.codec, "indices")
    idx = _load_npy(args.indices)
    data = codec.encode(idx, args.n, seed=args.seed)
    args.output.write_bytes(data)
    return 0


def _decode(args: argparse.Namespace) -> int:
    from ..codecs import codec_of

    from ..codecs.container import CodecError, unpack

    data = _read_payload(args.input)
    codec = codec_of(data)
    n = unpack(data).n
    if n > args.max_n:
        raise CodecError(f"header claims n={n}, above --max-n {args.max_n}; raise --max-n if you trust this payload")
    if codec.kind == "delta":
        msg = codec.decode(data, expect_n=args.expect_n)  # checks the structure
        print(f"deltamask codec decode: a {codec.name} payload ({msg.mode}) holds theta relative to a cached version "
              f"({msg.base.hex()[:12]}); only that client can decode it. `deltamask codec inspect` shows its fields",
              file=sys.stderr)
        return 2
    if codec.kind == "mask":
        probs = _load_npy(args.probs) if args.probs else None
        out = codec.decode(data, probs, expect_n=args.expect_n)
    else:
        out = codec.decode(data, expect_n=args.expect_n)
    with open(args.output, "wb") as fh:
        np.save(fh, out, allow_pickle=False)
    return 0


def inspect_payload(data: bytes, png_path: Path | None = None) -> dict[str, Any]:
    """Everything ``inspect`` prints: header fields, sizes, bits per key and the bound."""
    from ..codecs import codec_of, log2_binomial
    from ..codecs.fuse import FuseCodec

    codec = codec_of(data)
    info = codec.inspect(data)
    info["description"] = codec.description
    info["lossy"] = bool(codec.lossy)
    n, k = info["n"], info["count"]
    if codec.kind == "delta":
        msg = codec.decode(data)
        info.update(mode=msg.mode, level_kind=msg.kind, base_digest=msg.base.hex(), target_digest=msg.target.hex())
        if msg.mode == "cond":
            info.update(groups=len(msg.groups), total_new=msg.total_t, total_cached=msg.total_v)
        elif msg.mode == "replay":
            info.update(rounds=[r for r, _ in msg.rounds], payloads=sum(len(p) for _, p in msg.rounds))
        return info
    if codec.kind == "indices":
        bound = log2_binomial(n, k) if k <= n else float("nan")
        info["bits_per_key"] = info["total_bits"] / k if k else None
        info["bits_per_position"] = info["total_bits"] / n if n else None
        info["bound_bits"] = bound
        info["bound_bits_per_key"] = bound / k if k else None
        info["over_bound"] = info["total_bits"] / bound - 1 if bound > 0 else None
    if isinstance(codec, FuseCodec):
        from ..codecs.image import payload_to_png

        png = payload_to_png(data)
        info["png_bytes"] = len(png)
        if png_path is not None:
            png_path.write_bytes(png)
            info["png_path"] = str(png_path)
    elif png_path is not None:
        raise ValueError(f"--png needs a fuse filter payload; this one was written by {codec.name!r}")
    return info


def _inspect(args: argparse.Namespace) -> int:
    info = inspect_payload(_read_payload(args.input), args.png)
    print(json.dumps(info, indent=2, default=float))
    return 0


def _list(args: argparse.Namespace) -> int:
    from ..codecs import available_codecs, get_codec

    for name in available_codecs():
        c = get_codec(name)
        print(f"{name:14s} id={c.codec_id:<3d} {c.kind:8s} {c.description}")
    return 0


def run_codec(args: argparse.Namespace) -> int:
    """Handler of ``deltamask codec``: dispatch, and turn every expected failure into one line."""
    from ..codecs import CodecError

    cmd = getattr(args, "codec_cmd", None)
    handlers = {"encode": _encode, "decode": _decode, "inspect": _inspect, "list": _list}
    if cmd not in handlers:
        args._codec_parser.print_help(sys.stderr)
        return 2
    try:
        return handlers[cmd](args)
    except CodecError as e:
        print(f"deltamask codec {cmd}: invalid payload: {e}", file=sys.stderr)
    except KeyError as e:  # unknown codec name: the message lists the valid ones
        print(f"deltamask codec {cmd}: {e.args[0] if e.args else e}", file=sys.stderr)
    except FileNotFoundError as e:
        print(f"deltamask codec {cmd}: no such file: {e.filename}", file=sys.stderr)
    except (OSError, ValueError, MemoryError) as e:
        print(f"deltamask codec {cmd}: {type(e).__name__}: {e}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m deltamask.app.cli_codec codec ...``), for tests and debugging."""
    parser = argparse.ArgumentParser(prog="deltamask")
    sub = parser.add_subparsers(dest="command")
    add_codec_parser(sub)
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help(sys.stderr)
        return 2
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
