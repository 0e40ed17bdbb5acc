"""One typed, frozen configuration for an experiment, reachable three ways.

TOML presets (``configs/*.toml``), ``--set key=value`` overrides and Flower's ``run_config`` all end in
the same :class:`Config` via :func:`build_config`. Keys may be written ``snake_case`` or
``kebab-case``. Unknown keys and values of the wrong type raise :class:`ConfigError` naming the key.
Every key, its default and its meaning: ``deltamask config`` (or :func:`describe`).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names the key and how to fix it."""


#: the built-in methods (``method=``; plug-ins join through :func:`register_method_name`)
_MASK = ("deltamask", "fedpm")
_WEIGHT = ("fedavg", "qsgd", "signsgd", "topk", "drive", "eden", "lora")
BUILTIN_METHODS = (*_MASK, "linear-probe", *_WEIGHT)
#: the trackers ``tracking=`` names (comma-separated; ``none`` alone = off)
TRACKERS = ("tensorboard", "mlflow")

#: What a key changes: every :class:`Config` field says it in its metadata (``effect``), and the key sets
#: that used to be kept by hand are derived from it (:data:`HASH_EXCLUDED`, :data:`RESUME_OVERRIDABLE`,
#: :data:`CACHE_IGNORED`). Every field must say it (``_f(..., effect=...)``): a key that changes the clients' data
#: and forgot to say so would let a Flower node reuse a stale cache.
EFFECTS = {
    "data": "the clients' images, labels and split, or the frozen backbone's outputs on them (and so the result); "
            "keyed in a Flower node's cache",
    "result": "what the run computes",
    "length": "how many rounds run: a resumed run may extend it",
    "storage": "where the prefix outputs are kept, not what they are",
    "engine": "where the run executes (device): a resumed run may move; not in the Flower config hash",
    "report": "what the run reports, or when it gives up; never what it computes: a resumed run may change it, "
              "and server and clients may differ",
}


def _f(default: Any, help: str, choices: tuple[str, ...] | None = None, *, effect: str,
       methods: tuple[str, ...] | None = None, values: tuple[str, ...] | None = None) -> Any:
    """A config field and its metadata: ``help``; ``choices`` (the only values accepted); ``effect`` (a key of
    :data:`EFFECTS`, required); ``methods`` (the methods that read it; None = every method); ``values`` (documented
    values that plug-ins may extend, unlike ``choices``)."""
    if effect not in EFFECTS:
        raise ValueError(f"unknown effect {effect!r}")
    return field(default=default, metadata={"help": help, "choices": choices, "effect": effect, "methods": methods,
                                            "values": values})


@dataclass(frozen=True)
class Config:
    # --- experiment ---
    method: str = _f("deltamask", "federated method: deltamask, fedpm, linear-probe, or a baseline: fedavg, qsgd, signsgd, topk, drive, eden, lora", values=BUILTIN_METHODS, effect="result")
    model: str = _f(
        "efficientnet_lite0",
        "backbone spec: efficientnet_lite0 (built-in, offline), timm:NAME, torchvision:NAME, hf:ID_OR_PATH", effect="data")
    weights: str = _f("", "local checkpoint for the backbone (.pth/.safetensors/.bin); empty = the spec's pretrained default; random = random init", effect="data")
    dataset: str = _f("fashion-mnist", "data spec: fashion-mnist, digits, npz:PATH, folder:PATH, hf:NAME", effect="data")
    data_dir: str = _f("", "where to look for dataset files (fashion-mnist IDX files); empty = default places", effect="data")
    image_size: int = _f(64, "input resolution in pixels; 0 = the model's own input size", effect="data")
    train_samples: int = _f(3000, "stratified subset of the training set used across all clients (0 = all)", effect="data")
    test_samples: int = _f(1000, "stratified subset of the test set used for server evaluation (0 = all)", effect="data")
    seed: int = _f(0, "run seed; every random draw derives from (seed, round, client, purpose)", effect="data")
    device: str = _f("auto", "torch device: auto (CUDA if available), cpu, cuda, cuda:1, ...", effect="engine")
    # --- memory (prefix_cache.py) ---
    cache_dtype: str = _f("float32", "storage dtype of the cached prefix outputs; compute stays float32 (rows cast per batch), float16/bfloat16 halve the bytes", ("float32", "float16", "bfloat16"), effect="data")
    cache_ram_mb: int = _f(0, "RAM budget in MB of the prefix cache (train x2 for clients' copies + test); above it prefix_cache=auto stores it on disk (0 = no limit)", effect="storage")
    prefix_cache: str = _f("auto", "where the prefix outputs live: auto (RAM within cache_ram_mb, else disk), ram (refused above the budget), disk (a file under cache_dir, read per batch)", ("auto", "ram", "disk"), effect="storage")
    cache_dir: str = _f("", "directory of the disk prefix cache (files deleted when the run ends); empty = the system temp dir", effect="storage")
    # --- federation ---
    rounds: int = _f(30, "communication rounds in total, head warm-up included", effect="length")
    num_clients: int = _f(10, "number of clients the training set is split across", effect="data")
    clients_per_round: int = _f(5, "clients sampled each round (K)", effect="result")
    partition: str = _f("dirichlet", "how the training set is split across clients", ("iid", "dirichlet"), effect="data")
    alpha: float = _f(0.5, "Dirichlet concentration over labels (smaller = more non-IID)", effect="data")
    min_partition_size: int = _f(20, "minimum samples per client for the Dirichlet split", effect="data")
    weighted: bool = _f(False, "weight clients' masks / heads by their sample counts in aggregation", effect="result")
    min_replies: int = _f(1, "fewer good client replies than this skips the round's update", effect="result")
    downhill_rounds: int = _f(3, "report a walk downhill: global accuracy falling at this many consecutive evaluations, or the final accuracy ending downhill_drop below the run's best (record, summary.json, status line; 0 = off)", effect="report")
    downhill_drop: float = _f(0.02, "the smallest fall in accuracy (a fraction: 0.02 = 2 points) that downhill_rounds reports", effect="report")
    max_skipped_rounds: int = _f(3, "the run fails after this many consecutive rounds without an update (0 = never); a run that never updates fails too", effect="report")
    # --- untrusted clients (robust.py; benchmarks/bench_attacks.py) ---
    max_flip_fraction: float = _f(0.0, "deltamask: a reply flipping more than this fraction of the N masked weights is rejected; 0 = the protocol's own bound ceil(kappa * N), which no honest client exceeds", methods=("deltamask",), effect="result")
    flip_outlier: float = _f(3.0, "mask methods: a reply whose flips exceed this many times the round's median is rejected (3+ replies; honest max/median <= 1.1 measured; 0 = off)", methods=_MASK, effect="result")
    clip_factor: float = _f(5.0, "heads and weight updates: each client's update (per tensor for the head) is norm-clipped to this many times the round's median update norm (honest max/median <= 2.4 measured; 0 = off)", effect="result")
    robust_mean: str = _f("mean", "coordinate-wise rule that combines heads and weight updates", ("mean", "median", "trimmed-mean"), effect="result")
    trim_fraction: float = _f(0.2, "trimmed-mean: fraction of the replies cut at each end, per coordinate (at least one each end)", effect="result")
    max_abs_param: float = _f(1e4, "a client's head or weight-update entry must be finite with |x| <= this, else the reply is rejected", effect="result")
    root_samples: int = _f(0, "the server's root set (FLTrust, opt-in; needs labelled data on the server): this many training images outside every client's data. Each round with heads to combine the server trains the head on them from the same start, and weighs each client's head update by its cosine agreement with the server's update (0 where it points away), scaled to the server update's norm: a client training on flipped labels does not move the head. Replaces clip_factor and robust_mean for the head; 0 = off", methods=(*_MASK, "linear-probe"), effect="result")
    # --- local training ---
    local_epochs: int = _f(1, "local epochs per round (E)", effect="result")
    batch_size: int = _f(64, "local mini-batch size", effect="result")
    lr: float = _f(0.1, "Adam learning rate for mask scores", methods=_MASK, effect="result")
    head_lr: float = _f(0.01, "Adam learning rate for the linear head", effect="result")
    head_epochs: int = _f(5, "local epochs for the head in linear probing / warm-up rounds", effect="result")
    # --- masks (METHOD.md) ---
    masked_blocks: int = _f(5, "mask every weight matrix / conv kernel in the last L blocks (L)", effect="data")
    mask_pattern: str = _f("", "regex over parameter names selecting masked weights (overrides masked_blocks)", effect="data")
    theta0: float = _f(0.99, "initial keep-probability of every masked weight", methods=_MASK, effect="result")
    eps: float = _f(0.01, "probabilities are clipped to [eps, 1-eps] before any logit", methods=_MASK, effect="result")
    reset_every: int = _f(1, "reset Beta priors to Beta(1,1) every this many rounds (1 = FedPM, 0 = never)", methods=_MASK, effect="result")
    posterior_memory: float = _f(0.0, "mask methods: the Beta posterior keeps this fraction of the earlier rounds' evidence (alpha, beta decay towards Beta(1,1)) instead of resetting each round, so one round's few clients move theta less (0 = reset_every decides; needs reset_every 0 or 1; theta then goes down quantized, not as counts)", methods=_MASK, effect="result")
    posterior: str = _f("mode", "statistic of the Beta posterior broadcast as theta", ("mean", "mode"), methods=_MASK, effect="result")
    head_warmup_rounds: int = _f(3, "rounds of federated linear probing of the head before mask training", effect="result")
    train_head: bool = _f(False, "train the head jointly with the masks (head sent dense each round, counted)", methods=_MASK, effect="result")
    head_server_lr: float = _f(1.0, "train_head: the server moves the global head this fraction of the way to the clients' combined head each mask round (1 = plain FedAvg; < 1 damps the swing that a few label-skewed clients give it)", methods=_MASK, effect="result")
    client_loss: str = _f("auto", "local loss of mask methods' clients (scores, head): ce = cross-entropy; balanced = cross-entropy of the logits plus the client's own log label frequencies (logit adjustment, as in FedLC), so that a client's label skew does not pull the shared model towards its classes; auto = balanced for deltamask (its head warm-up included) and wherever the head is trained jointly (train_head=true), else ce (benchmarks/RESULTS.md, skewed clients)", ("auto", "ce", "balanced"), methods=(*_MASK, "linear-probe"), effect="result")
    # --- DeltaMask ---
    kappa: float = _f(0.1, "fraction of the delta (changed mask bits) kept, largest |theta_k - theta_g| first (0.3 before issue 9; benchmarks/RESULTS.md)", methods=("deltamask",), effect="result")
    kappa_schedule: str = _f("constant", "kappa over rounds", ("constant", "cosine"), methods=("deltamask",), effect="result")
    kappa_rank: str = _f("change", "how the delta is ranked for top-kappa: change = |theta_k - theta_g| (the paper), logit = |logit theta_k - logit theta_g| (moves near 0 and 1 count more)", ("change", "logit"), methods=("deltamask",), effect="result")
    kappa_min: float = _f(0.2, "final kappa of the cosine schedule", methods=("deltamask",), effect="result")
    # --- codecs ---
    codec: str = _f("auto", "uplink codec: an index-set codec for deltamask (auto = smallest exact), a mask codec for fedpm (auto = bitpack)", effect="result")
    downlink_codec: str = _f("auto", "downlink codec of theta: auto (counts when exact: probs-counts, probs-counts-rans from 2^24 masked weights; else q8), probs-counts-rans, probs-counts, probs-q8, probs-f32", methods=_MASK, effect="result")
    downlink: str = _f("auto", "theta to a client that holds an older version: auto (smallest of snapshot, cond, replay), snapshot (theta alone), cond (levels coded against the client's cached levels), replay (the uplinks it missed)", ("auto", "snapshot", "cond", "replay"), methods=_MASK, effect="result")
    downlink_history: int = _f(8, "theta versions the server keeps to code against (a client holding an older one gets a snapshot)", methods=_MASK, effect="result")
    head_codec: str = _f("f16", "codec of the dense head (f32 before issue 9; benchmarks/RESULTS.md)", ("f32", "f16"), effect="result")
    # --- output ---
    eval_every: int = _f(1, "evaluate the global model every this many rounds (and always at the last)", effect="result")
    eval_sampled: bool = _f(True, "also report accuracy with one sampled mask", effect="result")
    progress: bool = _f(True, "print a progress line per round to stderr", effect="report")
    # --- experiment tracking (run/tracking.py; README "Watch a run"; pip install 'deltamask[tracking]') ---
    tracking: str = _f("none", "log each round's metrics, the config and the end artifacts to a tracker: none, tensorboard, mlflow, or both comma-separated (tensorboard,mlflow); metrics.jsonl stays the record", effect="report")
    tracking_dir: str = _f("", "where the trackers write: empty = the run folder (OUT/tensorboard, MLflow store OUT/mlruns); a folder shared by several runs holds TRACKING_DIR/tensorboard/RUN_FOLDER_NAME and one MLflow store TRACKING_DIR/mlruns (Flower: below the server's output root)", effect="report")
    tracking_experiment: str = _f("", "MLflow experiment the run is logged in (empty = deltamask; deltamask compare: the suite's title)", effect="report")
    # --- baselines --- (weight-training baselines: fedavg, qsgd, signsgd, topk, drive, eden, lora; docs/baselines.md)
    weight_lr: float = _f(1e-4, "Adam learning rate of the trained weights / LoRA adapters in the weight-training baselines", methods=_WEIGHT, effect="result")
    qsgd_levels: int = _f(4, "QSGD: quantisation levels s per sign, 1..1024 (Alistarh et al. 2017)", methods=("qsgd",), effect="result")
    qsgd_bucket: int = _f(512, "QSGD: values per bucket, one f32 norm each (0 = one bucket; the paper's experiments use 512)", methods=("qsgd",), effect="result")
    signsgd_mode: str = _f("ef", "signSGD: ef = scaled sign with error feedback (Karimireddy et al. 2019), vote = majority vote (Bernstein et al. 2019)", ("ef", "vote"), methods=("signsgd",), effect="result")
    topk_ratio: float = _f(0.01, "TopK: fraction of the update's entries sent each round, with error feedback", methods=("topk",), effect="result")
    drive_scale: str = _f("unbiased", "DRIVE scale: unbiased = ||x||^2/||Rx||_1 (for averaging), mse = ||Rx||_1/d (biased)", ("unbiased", "mse"), methods=("drive",), effect="result")
    eden_bits: float = _f(0.5, "EDEN bits per coordinate: in (0,1) = sub-bit by random sub-sampling, or an integer 1..8", methods=("eden",), effect="result")
    rotation_block: int = _f(65536, "DRIVE/EDEN: randomized Hadamard block, a power of two >= 256 (0 = whole vector, padded)", methods=("drive", "eden"), effect="result")
    lora_rank: int = _f(4, "LoRA: rank r of the adapters on the maskable tensors", methods=("lora",), effect="result")
    lora_alpha: float = _f(0.0, "LoRA: scaling alpha, dW = alpha/r * B A (0 = r, scale 1)", methods=("lora",), effect="result")
    lora_dtype: str = _f("f32", "LoRA: adapter updates on the wire", ("f32", "f16"), methods=("lora",), effect="result")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **kw: Any) -> "Config":
        return build_config(overrides=kw, base=self)


FIELDS = {f.name: f for f in fields(Config)}


def keys_with(*effects: str) -> frozenset[str]:
    """The config keys whose ``effect`` is one of ``effects``."""
    return frozenset(k for k, f in FIELDS.items() if f.metadata["effect"] in effects)


#: method names ``method=`` accepts: the built-ins, plus plug-ins added by
#: :func:`deltamask.methods.register_method` (this module imports no method: methods build on it;
#: ``tests/run/test_round.py`` checks this list against the method registry)
METHOD_NAMES: list[str] = list(FIELDS["method"].metadata["values"])
#: keys that may differ between the Flower server and its clients (excluded from the config hash)
HASH_EXCLUDED: frozenset[str] = keys_with("report", "engine")
#: keys a resumed run may change: nothing it changes was computed differently by the rounds already done
RESUME_OVERRIDABLE: frozenset[str] = keys_with("report", "engine", "length")
#: keys that cannot change a client's data or the frozen backbone's outputs (a Flower node cache ignores them)
CACHE_IGNORED: frozenset[str] = frozenset(FIELDS) - keys_with("data")


def register_method_name(name: str) -> None:
    if name not in METHOD_NAMES:
        METHOD_NAMES.append(name)


def unused_keys(cfg: Config) -> list[str]:
    """Keys set away from their default that ``cfg.method`` never reads (from each field's ``methods``; a
    plug-in method may read any key)."""
    if cfg.method not in BUILTIN_METHODS:
        return []
    return [k for k, f in FIELDS.items()
            if f.metadata["methods"] is not None and cfg.method not in f.metadata["methods"] and getattr(cfg, k) != f.default]


def normalize_key(key: str) -> str:
    return key.strip().replace("-", "_")


def parse_bool(text: str) -> bool:
    """``true/false``, ``1/0``, ``yes/no`` (any case); anything else is a ValueError."""
    low = text.strip().lower()
    if low not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(text)
    return low in ("true", "1", "yes")


def _coerce(key: str, value: Any, from_string: bool) -> Any:
    f = FIELDS[key]
    typ = f.type if isinstance(f.type, type) else {"str": str, "int": int, "float": float, "bool": bool}[f.type]
    if from_string and isinstance(value, str):
        s = value.strip()
        try:
            if typ is bool:
                value = parse_bool(s)
            elif typ is int:
                value = int(s)
            elif typ is float:
                value = float(s)
            else:
                value = s
        except ValueError:
            raise ConfigError(f"config key {key!r} expects {typ.__name__}, got {value!r}") from None
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if typ is int and isinstance(value, float) and value.is_integer() and not from_string:
        value = int(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ConfigError(f"config key {key!r} expects {typ.__name__}, got {type(value).__name__} {value!r}")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"config key {key!r} must be one of {', '.join(choices)}; got {value!r}")
    return value


#: upper bounds on the sizes a config can ask for (a Flower run config is another party's input, and a typo
#: such as num_clients=100000000 should be a clear error, not an exhausted machine): key -> (limit, what it bounds)
LIMITS: dict[str, tuple[int, str]] = {
    "num_clients": (10_000, "clients (one partition each)"),
    "rounds": (100_000, "rounds"),
    "image_size": (4_096, "pixels per side"),
    "train_samples": (10_000_000, "training images (0 = all)"),
    "test_samples": (10_000_000, "test images (0 = all)"),
    "batch_size": (65_536, "images per batch"),
    "local_epochs": (1_000, "local epochs per round"),
    "head_epochs": (1_000, "head epochs per warm-up round"),
    "masked_blocks": (1_000, "masked blocks"),
    "downlink_history": (1_000, "theta versions kept for the downlink (each holds N floats)"),
    "min_partition_size": (1_000_000, "images per client at least"),
    "qsgd_levels": (65_535, "quantisation levels"),
    "qsgd_bucket": (1 << 24, "values per QSGD bucket"),
    "rotation_block": (1 << 26, "values per rotation block"),
    "lora_rank": (4_096, "LoRA rank"),
    "eval_every": (100_000, "rounds between evaluations"),
    "cache_ram_mb": (1 << 30, "MiB of prefix cache"),
    "root_samples": (100_000, "server-held root images (their prefix outputs stay in memory, float32)"),
}


def trackers_of(value: str) -> tuple[str, ...]:
    """The trackers a ``tracking`` value names, in :data:`TRACKERS` order: ``none`` (or empty) = (),
    else a comma-separated list of ``tensorboard`` and ``mlflow`` (spaces and case ignored). Anything else
    raises :class:`ConfigError`."""
    names = [n.strip().lower() for n in value.split(",")] if value.strip() else ["none"]
    if names == ["none"]:
        return ()
    bad = [n for n in names if n not in TRACKERS]
    if bad or len(set(names)) != len(names):
        raise ConfigError(
            f"config key 'tracking': {value!r} is not a tracker list; use none, tensorboard, mlflow or tensorboard,mlflow"
            + (f" ({', '.join(repr(b) for b in bad)} unknown)" if bad else " (a tracker named twice)")
        )
    return tuple(t for t in TRACKERS if t in names)


def _validate(cfg: Config) -> None:
    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"config key {key!r}: {msg}")

    for key, (limit, what) in LIMITS.items():
        need(getattr(cfg, key) <= limit, key, f"{getattr(cfg, key)} is over the limit of {limit:,} {what}")
    need(abs(cfg.seed) < 1 << 63, "seed", "must fit in 64 bits")

    need(cfg.method in METHOD_NAMES, "method", f"unknown method {cfg.method!r}; valid: {', '.join(sorted(METHOD_NAMES))}")
    from .codecs import available_codecs

    uplink = sorted(set(available_codecs("indices") + available_codecs("mask") + ["auto"]))
    need(cfg.codec in uplink, "codec", f"unknown uplink codec {cfg.codec!r}; valid: {', '.join(uplink)}")
    down = ["auto"] + available_codecs("probs")
    need(cfg.downlink_codec in down, "downlink_codec", f"unknown downlink codec {cfg.downlink_codec!r}; valid: {', '.join(down)}")
    need(cfg.rounds >= 1, "rounds", "must be >= 1")
    need(cfg.num_clients >= 1, "num_clients", "must be >= 1")
    need(1 <= cfg.clients_per_round <= cfg.num_clients, "clients_per_round", "must be in 1..num_clients")
    need(cfg.local_epochs >= 1, "local_epochs", "must be >= 1")
    need(cfg.batch_size >= 1, "batch_size", "must be >= 1")
    need(0.0 < cfg.eps < 0.5, "eps", "must be in (0, 0.5)")
    need(0.0 < cfg.theta0 < 1.0, "theta0", "must be in (0, 1)")
    need(0.0 < cfg.kappa <= 1.0, "kappa", "must be in (0, 1]")
    need(0.0 < cfg.kappa_min <= 1.0, "kappa_min", "must be in (0, 1]")
    need(cfg.alpha > 0, "alpha", "must be > 0")
    need(cfg.masked_blocks >= 1 or cfg.mask_pattern != "", "masked_blocks", "must be >= 1 (or set mask_pattern)")
    need(cfg.reset_every >= 0, "reset_every", "must be >= 0")
    need(0.0 <= cfg.posterior_memory < 1.0, "posterior_memory", "must be in [0, 1) (0 = off)")
    need(cfg.posterior_memory == 0.0 or cfg.reset_every in (0, 1), "posterior_memory",
         "replaces the periodic reset: use it with reset_every 0 or 1")
    need(cfg.downlink_history >= 1, "downlink_history", "must be >= 1")
    need(cfg.head_warmup_rounds >= 0, "head_warmup_rounds", "must be >= 0")
    need(cfg.image_size >= 0, "image_size", "must be >= 0 (0 = the model's own size)")
    need(cfg.lr > 0 and cfg.head_lr > 0, "lr", "learning rates must be > 0")
    need(1 <= cfg.min_replies <= cfg.clients_per_round, "min_replies", f"must be in 1..clients_per_round={cfg.clients_per_round} (more replies than clients per round can never arrive)")
    need(0.0 < cfg.head_server_lr <= 1.0, "head_server_lr", "must be in (0, 1] (1 = plain FedAvg of the heads)")
    # the skew options act only where their method computes them: set anywhere else, they are refused, not ignored
    need(cfg.head_server_lr == 1.0 or (cfg.train_head and cfg.method in _MASK), "head_server_lr",
         "moves the jointly trained head of deltamask / fedpm: set train_head=true with one of them, or leave it at 1")
    need(cfg.posterior_memory == 0.0 or cfg.method in _MASK, "posterior_memory",
         f"is a memory of the mask posterior: only deltamask and fedpm have one (method is {cfg.method!r})")
    need(cfg.client_loss != "balanced" or cfg.method in FIELDS["client_loss"].metadata["methods"], "client_loss",
         f"balanced applies to deltamask, fedpm and linear-probe; the weight-training baselines ({cfg.method!r}) train "
         "with plain cross-entropy")
    need(cfg.downhill_rounds >= 0, "downhill_rounds", "must be >= 0 (0 = off)")
    need(0.0 <= cfg.downhill_drop <= 1.0, "downhill_drop", "must be in [0, 1] (a fraction of accuracy)")
    need(cfg.max_skipped_rounds >= 0, "max_skipped_rounds", "must be >= 0 (0 = never fail for skipped rounds)")
    need(cfg.eval_every >= 1, "eval_every", "must be >= 1")
    need(cfg.cache_ram_mb >= 0, "cache_ram_mb", "must be >= 0 (0 = no limit)")
    need(0.0 <= cfg.max_flip_fraction <= 1.0, "max_flip_fraction", "must be in [0, 1] (0 = ceil(kappa * N))")
    need(cfg.flip_outlier == 0 or cfg.flip_outlier >= 1.0, "flip_outlier", "must be 0 (off) or >= 1 (a multiple of the round's median)")
    need(cfg.clip_factor == 0 or cfg.clip_factor >= 1.0, "clip_factor", "must be 0 (off) or >= 1 (a multiple of the round's median norm)")
    need(0.0 <= cfg.trim_fraction < 0.5, "trim_fraction", "must be in [0, 0.5)")
    need(cfg.max_abs_param > 0, "max_abs_param", "must be > 0")
    need(cfg.root_samples >= 0, "root_samples", "must be >= 0 (0 = no root set)")
    need(cfg.root_samples == 0 or cfg.method in FIELDS["root_samples"].metadata["methods"], "root_samples",
         f"weighs client heads: it applies to deltamask, fedpm and linear-probe, not to {cfg.method!r}'s weight updates")
    need(cfg.root_samples == 0 or cfg.robust_mean == "mean", "root_samples",
         f"and robust_mean={cfg.robust_mean!r} both choose how heads are combined: set one of them")
    need(cfg.root_samples == 0 or cfg.method == "linear-probe" or cfg.head_warmup_rounds > 0 or cfg.train_head, "root_samples",
         "weighs client heads, but this run combines none: deltamask and fedpm combine heads in the head_warmup_rounds "
         "(0 here) and, with train_head=true, in every mask round")
    trackers_of(cfg.tracking)  # raises naming the key


def build_config(
    overrides: Mapping[str, Any] | None = None,
    *,
    base: Config | None = None,
    from_strings: bool = False,
) -> Config:
    """A validated Config: ``base`` (default: defaults) updated with ``overrides``."""
    values = (base or Config()).to_dict()
    for raw_key, value in (overrides or {}).items():
        key = normalize_key(raw_key)
        if key not in FIELDS:
            close = [k for k in FIELDS if k.startswith(key[:3])] if len(key) >= 3 else []
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"unknown config key {raw_key!r}{hint}; run `deltamask config` to list every key")
        values[key] = _coerce(key, value, from_strings)
    cfg = Config(**values)
    _validate(cfg)
    return cfg


def read_toml(path: str | Path, what: str = "config file", hint: str = "") -> dict[str, Any]:
    """Parse a TOML file; a missing or malformed file raises ConfigError naming ``what`` and the path."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {str(p)!r} does not exist{hint}")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{what} {str(p)!r} is not valid TOML: {e}") from None


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a preset; a ``[deltamask]`` table is accepted as well as top-level keys."""
    p = Path(path)
    data = read_toml(p)
    if "deltamask" in data and isinstance(data["deltamask"], dict):
        data = data["deltamask"]
    for k, v in data.items():
        if isinstance(v, dict):
            raise ConfigError(f"config file {str(p)!r}: unexpected table [{k}]; keys are flat (see `deltamask config`)")
    return data


def client_loss_of(cfg: Config) -> str:
    """The local loss ``client_loss`` resolves to: ``auto`` is ``balanced`` for DeltaMask and with a jointly
    trained head (issue 25: measured on the skewed grid and the presets), plain cross-entropy elsewhere (FedPM
    with a frozen head and linear probing stay as they were: not measured with it)."""
    if cfg.client_loss == "auto":
        return "balanced" if cfg.train_head or cfg.method == "deltamask" else "ce"
    return cfg.client_loss


def stability_warnings(cfg: Config) -> list[str]:
    """Settings measured to make a run unstable (issue 25), said when the run starts rather than found in
    its trajectory: each a line naming the setting and what to set instead."""
    out = [f"{k}={getattr(cfg, k)!r} has no effect with method={cfg.method!r} (it is read by "
           f"{', '.join(FIELDS[k].metadata['methods'])}); remove it or pick one of those methods" for k in unused_keys(cfg)]
    skewed = cfg.partition == "dirichlet" and cfg.clients_per_round < cfg.num_clients
    if cfg.method in ("deltamask", "fedpm") and cfg.train_head and cfg.client_loss == "ce" and skewed:
        out.append(
            "train_head=true with client_loss=ce on label-skewed clients (partition=dirichlet, "
            f"{cfg.clients_per_round} of {cfg.num_clients} per round): the jointly trained head swings with the clients "
            "selected each round (benchmarks/RESULTS.md, skewed clients); client_loss=balanced (the default with "
            "train_head) keeps it steadier"
        )
    return out


@dataclass(frozen=True)
class EngineSettings:
    """Engine keys: where and how a run executes, never what it computes. Flower's ``run_config`` takes them
    beside the experiment keys (kebab-case), and a preset may hold them too (``deltamask run --config`` uses
    ``out-dir``; the others steer the Flower engine only)."""

    out_dir: str = _f("", "where the run is written; Flower: an absolute path (empty: ~/deltamask-runs/flower-RUN_ID)", effect="engine")
    round_timeout: float = _f(600.0, "seconds the server waits for a round's replies; a client not back by then is dropped (Flower; the local engine only when a run sets it)", effect="engine")
    node_wait_timeout: float = _f(120.0, "Flower: seconds the server waits before round 1 for num-clients nodes; none at all fails the run", effect="engine")
    resume: bool = _f(False, "Flower: continue the interrupted run in out-dir (locally: deltamask run --resume DIR)", effect="engine")
    overwrite: bool = _f(False, "replace a run already in out-dir (otherwise it is refused)", effect="engine")


#: the engine keys, kebab-case: (default, help), from :class:`EngineSettings`
ENGINE_KEYS: dict[str, tuple[Any, str]] = {
    f.name.replace("_", "-"): (f.default, f.metadata["help"]) for f in fields(EngineSettings)
}


def split_engine_keys(items: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(experiment keys, engine keys with snake_case names and their declared types)."""
    exp: dict[str, Any] = {}
    engine: dict[str, Any] = {}
    for key, value in items.items():
        k = key.strip().replace("_", "-")
        if k not in ENGINE_KEYS:
            exp[key] = value
            continue
        default = ENGINE_KEYS[k][0]
        try:
            if isinstance(default, bool) and isinstance(value, str):
                value = parse_bool(value)
            engine[k.replace("-", "_")] = type(default)(value)
        except (TypeError, ValueError):
            raise ConfigError(f"engine key {key!r} expects {type(default).__name__}, got {value!r}") from None
    return exp, engine


def parse_sets(items: list[str]) -> dict[str, str]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}``; a missing ``=`` is an error."""
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v
    return out


def from_sources(toml_path: str | None = None, sets: list[str] | None = None, with_engine: bool = False) -> Any:
    """Defaults <- TOML preset <- ``--set`` overrides. A preset may hold engine keys
    (:data:`ENGINE_KEYS`); ``with_engine=True`` returns ``(config, engine keys)``."""
    preset, engine = split_engine_keys(load_toml(toml_path)) if toml_path else ({}, {})
    cfg = build_config(preset) if toml_path else Config()
    set_items, set_engine = split_engine_keys(parse_sets(sets or []))
    engine.update(set_engine)
    cfg = build_config(set_items, base=cfg, from_strings=True)
    return (cfg, engine) if with_engine else cfg


def describe() -> list[tuple[str, str, Any, str]]:
    """(key, type, default, help) for every key, in declaration order."""
    rows = []
    for f in fields(Config):
        help_ = f.metadata.get("help", "")
        if f.metadata.get("choices"):
            help_ += f" [{' | '.join(f.metadata['choices'])}]"
        if f.metadata.get("methods"):
            help_ += f" (read by: {', '.join(f.metadata['methods'])})"
        rows.append((f.name, f.type if isinstance(f.type, str) else f.type.__name__, f.default, help_))
    return rows
