"""The ``deltamask`` command. Each sub-command parses, calls the library, writes files.

    deltamask run [--config FILE.toml] [--set key=value ...] [--out DIR] [--resume DIR] [--plugin FILE.py|MODULE ...]
    deltamask config [--format table|toml|json]      every config key, its default and meaning
    deltamask report DIR                              redraw plots from DIR/metrics.jsonl
    deltamask predict --model DIR/model.safetensors IMAGE...
    deltamask export DIR --format hf|timm|torchvision|onnx|mask [--out DIR] [--overwrite]

User errors (bad keys, missing data or weights, corrupted state) print one line and exit 2;
no traceback. ``main(argv)`` returns the exit code, so tests call it in-process.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable

from ..config import ConfigError, describe

EXIT_USER_ERROR = 2
#: a run that started but failed (too many rounds without an update, no node joined): summary.json says why
EXIT_RUN_FAILED = 1
DEFAULT_OUT = "runs/latest"


def _user_errors() -> tuple[type[BaseException], ...]:
    from ..run.artifact import ArtifactError
    from ..codecs import CodecError
    from ..data import DataError
    from ..model.backbones import ModelError
    from ..run.state import StateError
    from ..export.core import ExportError

    return (ConfigError, DataError, ModelError, StateError, ArtifactError, CodecError, ExportError, FileNotFoundError)


def load_plugins(specs: list[str] | None) -> None:
    """Import each plug-in (a ``.py`` file or a module name) so that the codecs, methods and model families it
    registers are known to this run (docs/architecture.md). A plug-in that cannot be imported is a ConfigError."""
    import importlib
    import importlib.util

    for spec in specs or []:
        try:
            if spec.endswith(".py"):
                path = Path(spec).expanduser().resolve()
                if not path.is_file():
                    raise ConfigError(f"--plugin {spec!r}: no such file")
                name = f"deltamask_plugin_{path.stem}"
                if any(getattr(m, "__file__", None) and Path(m.__file__).resolve() == path for m in list(sys.modules.values())):
                    continue  # this file is already imported (under any name): its registrations stand
                mod_spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(mod_spec)  # type: ignore[arg-type]
                sys.modules[name] = module
                try:
                    mod_spec.loader.exec_module(module)  # type: ignore[union-attr]
                except BaseException:
                    sys.modules.pop(name, None)
                    raise
            else:
                importlib.import_module(spec)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - the plug-in's own error, said in one line
            raise ConfigError(f"--plugin {spec!r} could not be imported: {type(e).__name__}: {e}") from None


def cmd_run(args: argparse.Namespace) -> int:
    from ..engines.local import run_local
    from ..run.round import run_target

    load_plugins(args.plugin)
    cfg, out, overwrite, engine = run_target(args.config, args.set, args.out, args.resume, args.overwrite, DEFAULT_OUT)
    # runs/latest is the scratch folder, replaced by every run; a named folder is kept unless asked
    overwrite = overwrite or (not args.resume and out == Path(DEFAULT_OUT))
    # round-timeout applies locally only where the preset sets it: local clients otherwise take their time
    summary = run_local(cfg, out, resume=bool(args.resume), overwrite=overwrite, round_timeout=engine.get("round_timeout"))
    fa, bu = summary.get("final_accuracy"), summary.get("mean_uplink_bpp")
    print(
        f"{cfg.method}: final accuracy {fa:.4f} (best {summary.get('best_accuracy', 0):.4f}), "
        f"mean uplink {bu:.4f} bpp, mean downlink {summary.get('mean_downlink_bpp', 0):.4f} bpp, "
        f"{summary.get('total_uplink_bytes', 0):,} B up / {summary.get('total_downlink_bytes', 0):,} B down, "
        f"{summary.get('elapsed_seconds', 0):.0f}s -> {out}"
    )
    if summary.get("downhill"):
        from ..run.round import describe_downhill

        print(f"{cfg.method}: WALKED DOWNHILL: {describe_downhill(summary['downhill'])} (summary.json 'downhill')")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    rows = describe()
    if args.format == "json":
        print(json.dumps([{"key": k, "type": t, "default": d, "help": h} for k, t, d, h in rows], indent=2))
    elif args.format == "toml":
        for k, t, d, h in rows:
            print(f"# {h} ({t})")
            print(f"{k} = {json.dumps(d)}\n")
    else:
        w = max(len(k) for k, *_ in rows)
        for k, t, d, h in rows:
            print(f"{k:<{w}}  {t:<5}  {json.dumps(d):<22}  {h}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ..run.report import plot_run

    d = Path(args.dir)
    if not (d / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"{str(d / 'metrics.jsonl')!r} does not exist: pass a run's output folder")
    for p in plot_run(d):
        print(p)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from ..run.artifact import load_artifact

    model = load_artifact(args.model, weights=args.weights)
    imgs = []
    for path in args.images:
        if not Path(path).is_file():
            raise FileNotFoundError(f"image {path!r} does not exist")
        imgs.append(np.asarray(Image.open(path).convert("RGB").resize((model.image_size, model.image_size))))
    probs = model.predict_proba(np.stack(imgs))
    for path, p in zip(args.images, probs):
        k = int(p.argmax())
        print(json.dumps({"image": path, "class": k, "label": model.classes[k], "probability": round(float(p[k]), 4)}))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import shlex

    from ..export import export_run

    load_plugins(args.plugin)
    cmd = " ".join(["deltamask", *map(shlex.quote, args.argv)]) if args.argv else None
    res = export_run(args.dir, args.format, args.out, overwrite=args.overwrite, command=cmd)
    print(f"{res.format} export in {res.out}: {', '.join(res.files)}")
    print(f"verified: logits match deltamask's model within rtol={res.rtol:g}, atol={res.atol:g} (max |diff| {res.max_abs_diff:.3g})")
    for tracker, where in res.tracked.items():
        print(f"logged to the run's {tracker}: {where}")
    if res.format == "mask":
        f = res.facts
        print(f"mask: {f['mask_bytes']:,} B ({f['mask_bits_per_weight']:.4f} bits per masked weight, {f['num_masked']:,} weights; "
              f"bit-packed {f['bitpacked_mask_bytes']:,} B); file {f['file_bytes']:,} B with the head")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deltamask", description="Federated fine-tuning by communicating mask deltas (DeltaMask, FedPM).")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (tracebacks of dropped clients)")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a federated experiment (defaults: DeltaMask, EfficientNet-Lite0, Fashion-MNIST)")
    r.add_argument("--config", help="TOML preset (see configs/)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    r.add_argument("--out", default=None, help=f"output folder (default: the preset's out-dir, else {DEFAULT_OUT}, which every run replaces)")
    r.add_argument("--resume", metavar="DIR", help="continue the interrupted run in DIR")
    r.add_argument("--overwrite", action="store_true", help="replace the run already in --out (otherwise a named folder holding a run is refused)")
    r.add_argument("--plugin", action="append", metavar="FILE.py|MODULE",
                   help="import a plug-in first: the codecs, methods and model families it registers (repeatable; "
                        "docs/architecture.md; give it again with --resume)")
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("config", help="list every config key with its default and meaning")
    c.add_argument("--format", choices=("table", "toml", "json"), default="table")
    c.set_defaults(func=cmd_config)

    rep = sub.add_parser("report", help="redraw a run's plots from its metrics.jsonl")
    rep.add_argument("dir")
    rep.set_defaults(func=cmd_report)

    pr = sub.add_parser("predict", help="classify images with a fine-tuned model artifact")
    pr.add_argument("--model", required=True, help="a run's model.safetensors")
    pr.add_argument("--weights", default=None, help="override the backbone weights path stored in the artifact")
    pr.add_argument("images", nargs="+")
    pr.set_defaults(func=cmd_predict)

    ex = sub.add_parser("export", help="export a finished run's model for transformers, timm, torchvision, ONNX, or as its coded mask")
    ex.add_argument("dir", help="the run's output folder (holding model.safetensors)")
    ex.add_argument("--format", required=True, choices=("hf", "timm", "torchvision", "onnx", "mask"),
                    help="hf: transformers directory (ViT, DINOv2); timm / torchvision: state dict + constructor call; "
                         "onnx: any family; mask: the entropy-coded mask + head, loaded with deltamask.export.load_mask_export")
    ex.add_argument("--out", default=None, help="output folder (default: DIR/export-FORMAT)")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing export in --out")
    ex.add_argument("--plugin", action="append", metavar="FILE.py|MODULE", help="import a plug-in first (the run's model family)")
    ex.set_defaults(func=cmd_export)

    for mod, fn in (
        (".cli_codec", "add_codec_parser"),
        (".bench", "add_bench_parser"),
        (".compare", "add_compare_parser"),
        ("..engines.flower.cli", "add_flower_parser"),
    ):
        adder = _optional(mod, fn)
        if adder is not None:
            adder(sub)
    return p


def _optional(module: str, attr: str) -> Callable[[Any], None] | None:
    import importlib
    import importlib.util

    try:
        m = importlib.import_module(module, __package__)
    except ModuleNotFoundError as e:
        if e.name == importlib.util.resolve_name(module, __package__) or e.name == "flwr":  # not built yet / Flower not installed
            return None
        raise
    return getattr(m, attr)


def main(argv: list[str] | None = None) -> int:
    from ..errors import RunFailed

    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except _user_errors() as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        msg = " ".join(msg.split())  # one line, whatever the exception's layout
        print(f"deltamask: error: {msg}", file=sys.stderr)
        if args.verbose:
            raise
        return EXIT_USER_ERROR
    except RunFailed as e:
        print(f"deltamask: run failed: {e}", file=sys.stderr)
        return EXIT_RUN_FAILED
    except KeyboardInterrupt:
        print("deltamask: interrupted; resume with `deltamask run --resume DIR`", file=sys.stderr)
        return 130


def entry() -> None:
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:  # `deltamask config | head`: the reader left; not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    sys.exit(code)


if __name__ == "__main__":
    entry()
