"""Whole-model conversion to fusedgrad's BatchNorm modules: convert_batchnorm and
convert_sync_batchnorm, each optionally returning a report of what it replaced and what it left.

Converted modules share the original's Parameter and buffer objects (same device, dtype, values;
an optimizer holding them keeps working), its train/eval mode and, for BatchNorm + activation
layers, its ``act`` and ``drop`` child modules themselves. Types are matched exactly: a subclass
may override forward, and replacing it would silently change what the model computes.

timm is never imported here; its classes are recognised by qualified name.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from torch import nn

from .batch_norm_act import BatchNormAct2d, SyncBatchNormAct2d
from .batch_norm_modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .sync_batch_norm import SyncBatchNorm

_TIMM_BN_ACT = "timm.layers.norm_act.BatchNormAct2d"
_TIMM_SYNC_BN_ACT = "timm.layers.norm_act.SyncBatchNormAct"

_PLAIN = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}
_FUSED_TYPES = (BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormAct2d, SyncBatchNorm)


def _qualname(module: nn.Module) -> str:
    kind = type(module)
    return f"{kind.__module__}.{kind.__qualname__}"


def _is_norm_like(module: nn.Module) -> bool:
    """Batch norms of any origin, including frozen ones (not _BatchNorm subclasses)."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) \
        or "BatchNorm" in type(module).__name__


def _is_frozen(module: nn.Module) -> bool:
    return type(module).__name__.startswith("Frozen") and "BatchNorm" in type(module).__name__


@dataclass
class ConversionReport:
    """What a converter did. ``converted``: (path, old type, new type) per replaced module;
    ``left``: (path, type, reason) per batch norm left as it was. Paths are
    ``named_modules()`` names ("" for the root)."""

    converted: list[tuple[str, str, str]] = field(default_factory=list)
    left: list[tuple[str, str, str]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """{"old type -> new type": number converted}."""
        out: dict[str, int] = {}
        for _, old, new in self.converted:
            key = f"{old} -> {new}"
            out[key] = out.get(key, 0) + 1
        return out

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)}, left {len(self.left)}"]
        lines += [f"  {n} x {kinds}" for kinds, n in self.counts().items()]
        lines += [f"  left {path or '<root>'} ({kind}): {why}" for path, kind, why in self.left]
        return "\n".join(lines)


def adopt_state(new: nn.Module, old: nn.Module) -> nn.Module:
    """Give ``new`` (built on the meta device) ``old``'s Parameter and buffer objects and
    mode: an optimizer holding them keeps working and nothing is copied or moved."""
    if old.affine:
        new.weight = old.weight
        new.bias = old.bias
    new.running_mean = old.running_mean
    new.running_var = old.running_var
    new.num_batches_tracked = old.num_batches_tracked
    if hasattr(old, "qconfig"):
        new.qconfig = old.qconfig
    new.train(old.training)
    return new


def _adopt_norm_act(new: nn.Module, old: nn.Module) -> nn.Module:
    # timm's SyncBatchNormAct gets act/drop as attributes after construction: maybe absent.
    new.act = old.act if hasattr(old, "act") else nn.Identity()
    new.drop = old.drop if hasattr(old, "drop") else nn.Identity()
    return adopt_state(new, old)


def _bn_args(bn: nn.Module) -> dict:
    return dict(eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                track_running_stats=bn.track_running_stats, device="meta")


def _walk(module: nn.Module, convert_one, report: ConversionReport, path: str = ""):
    """Depth-first replacement: ``convert_one(module, path)`` returns a replacement or None
    (then the module's children are visited)."""
    new = convert_one(module, path, report)
    if new is not None:
        report.converted.append((path, _qualname(module), _qualname(new)))
        return new
    for name, child in module.named_children():
        converted = _walk(child, convert_one, report, f"{path}.{name}" if path else name)
        if converted is not child:
            module.add_module(name, converted)
    return module


def _left_reason(module: nn.Module, sync: bool) -> str | None:
    """Why a batch norm this converter does not replace is left (None: not a batch norm)."""
    if not _is_norm_like(module):
        return None
    if _is_frozen(module):
        return ("frozen batch norm (fixed statistics and affine): left as is, type kept "
                "(timm's and torchvision's freeze/unfreeze helpers test for it)")
    if isinstance(module, nn.modules.lazy.LazyModuleMixin):
        return ("lazy module, parameters not initialised yet: run one forward (it then becomes "
                "a BatchNorm*d) and convert after")
    if isinstance(module, SyncBatchNorm):
        return "already a fusedgrad SyncBatchNorm"
    if not sync and isinstance(module, _FUSED_TYPES):
        return "already a fusedgrad module"
    if not sync and (isinstance(module, nn.SyncBatchNorm)
                     or _qualname(module) == _TIMM_SYNC_BN_ACT):
        return "a SyncBatchNorm: use fusedgrad.convert_sync_batchnorm"
    return (f"{_qualname(module)} is not a type this converter knows (a subclass may change "
            f"forward): left as is")


def convert_batchnorm(module: nn.Module, *, report: bool = False):
    """Replace torch's BatchNorm1d/2d/3d and timm's BatchNormAct2d in ``module`` by fusedgrad's
    BatchNorm1d/2d/3d and BatchNormAct2d (exact types; the same Parameters, buffers, mode and
    ``act``/``drop`` children). Frozen batch norms, SyncBatchNorms and unknown subclasses are
    left as they are.

    Returns the converted module (a new object if ``module`` itself is replaced); with
    ``report=True`` returns ``(module, ConversionReport)``."""
    def convert_one(m, path, rep):
        kind = type(m)
        if kind in _PLAIN:
            return adopt_state(_PLAIN[kind](m.num_features, **_bn_args(m)), m)
        if _qualname(m) == _TIMM_BN_ACT:
            return _adopt_norm_act(BatchNormAct2d(m.num_features, apply_act=False,
                                                  **_bn_args(m)), m)
        why = _left_reason(m, sync=False)
        if why is not None:
            rep.left.append((path, _qualname(m), why))
        return None

    rep = ConversionReport()
    out = _walk(module, convert_one, rep)
    return (out, rep) if report else out


def convert_sync_batchnorm(module: nn.Module, process_group=None, *, report: bool = False):
    """Replace every batch norm that computes batch statistics by fusedgrad's synchronised one
    (as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``), never dropping a submodule:

    - torch's BatchNorm1d/2d/3d and SyncBatchNorm, fusedgrad's BatchNorm1d/2d/3d
      -> ``fusedgrad.SyncBatchNorm``;
    - timm's BatchNormAct2d and SyncBatchNormAct, fusedgrad's BatchNormAct2d
      -> ``fusedgrad.SyncBatchNormAct2d`` keeping their ``act`` and ``drop`` modules;
    - frozen batch norms (nothing to synchronise) and fusedgrad's synced modules stay;
    - any other batch norm subclass stays as it is, with a warning: replacing it would drop
      whatever its own forward adds.

    Returns the module; with ``report=True``, ``(module, ConversionReport)``."""
    plain = set(_PLAIN) | {nn.SyncBatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d}

    def convert_one(m, path, rep):
        if type(m) in plain:
            return adopt_state(SyncBatchNorm(m.num_features, process_group=process_group,
                                             **_bn_args(m)), m)
        if type(m) is BatchNormAct2d or _qualname(m) in (_TIMM_BN_ACT, _TIMM_SYNC_BN_ACT):
            new = SyncBatchNormAct2d(m.num_features, apply_act=False,
                                     process_group=process_group, **_bn_args(m))
            return _adopt_norm_act(new, m)
        why = _left_reason(m, sync=True)
        if why is not None:
            rep.left.append((path, _qualname(m), why))
            if not _is_frozen(m) and not isinstance(m, SyncBatchNorm):
                warnings.warn(f"fusedgrad.convert_sync_batchnorm: {path or '<root>'}: {why}; "
                              f"its batch statistics stay per-process", stacklevel=2)
        return None

    rep = ConversionReport()
    out = _walk(module, convert_one, rep)
    return (out, rep) if report else out
