"""Load a V-JEPA pretraining checkpoint into an encoder, strictly, and say what did not fit.

A V-JEPA checkpoint is a dict with `encoder`, `target_encoder`, `predictor`, `opt`, `epoch`, ...;
its parameter names carry DDP's `module.` and V-JEPA's `backbone.` prefixes. The target
(EMA) encoder is the one V-JEPA evaluates, so it is taken by default.

Example:
    >>> report = load_encoder_checkpoint("vitl.pt", encoder)  # doctest: +SKIP
    >>> report = inspect_checkpoint("vitl.pt", encoder); print(report.summary())  # doctest: +SKIP
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from octft.errors import OctftError

# Searched in this order when no key is given.
ENCODER_KEYS = ("target_encoder", "encoder")
# Wrappers that prefix names: DDP (`module.`), V-JEPA's MultiMask wrapper (`backbone.`), torch.compile.
STRIPPED_PREFIXES = ("module.", "backbone.", "_orig_mod.")


class CheckpointError(OctftError):
    """A file that cannot be used as an encoder checkpoint; the message names the file."""


@dataclass
class LoadReport:
    """What loading a checkpoint into a model did, key by key (names after prefix stripping)."""

    path: str
    source_key: str | None  # the checkpoint entry used ("target_encoder", ...); None for a plain state dict
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the checkpoint
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not in the model
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)  # (key, ckpt, model)

    @property
    def ok(self) -> bool:
        """True when every key matched in name and shape."""
        return not (self.missing or self.unexpected or self.mismatched)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (shapes as lists), for `octft checkpoint inspect --json`."""
        data = asdict(self)
        data["mismatched"] = [
            {"key": key, "checkpoint_shape": list(ckpt), "model_shape": list(model)}
            for key, ckpt, model in self.mismatched
        ]
        data["ok"] = self.ok
        return data

    def summary(self, limit: int | None = None) -> str:
        """Readable, one problem per line; `limit` caps the lines shown per kind of problem."""
        source = f"[{self.source_key}]" if self.source_key else "(plain state dict)"
        lines = [
            f"{self.path} {source}: {len(self.loaded)} loaded, {len(self.missing)} missing, "
            f"{len(self.unexpected)} unexpected, {len(self.mismatched)} shape-mismatched"
        ]
        problems = [
            [f"  missing (model only): {key}" for key in self.missing],
            [f"  unexpected (checkpoint only): {key}" for key in self.unexpected],
            [
                f"  shape mismatch: {key} checkpoint {list(ckpt)} vs model {list(model)}"
                for key, ckpt, model in self.mismatched
            ],
        ]
        for kind in problems:
            shown = kind if limit is None else kind[:limit]
            lines += shown
            if len(kind) > len(shown):
                lines.append(f"  ... and {len(kind) - len(shown)} more")
        return "\n".join(lines)


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's keys or shapes do not match the model; `report` holds the details."""

    def __init__(self, message: str, report: LoadReport):
        super().__init__(message)
        self.report = report


def strip_prefixes(name: str) -> str:
    """`module.backbone.blocks.0.norm1.weight` -> `blocks.0.norm1.weight`."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in STRIPPED_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix) :], True
    return name


def _load_file(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file; check the path")
    try:
        # mmap leaves the predictor and optimizer state on disk instead of in host memory.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - every failure means "not a usable checkpoint"
        failure = error
    if "mmap" in str(failure):  # the legacy (non-zip) format cannot be memory-mapped
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001
            failure = error
    lines = str(failure).strip().splitlines() or ["no details"]
    # weights_only's refusal is a long how-to; the line naming the refused object is the useful one.
    first_line = next((line.strip() for line in lines if "unsupported global" in line.lower()), lines[0])
    raise CheckpointError(
        f"{path}: not a PyTorch checkpoint that loads with weights_only=True "
        f"({type(failure).__name__}: {first_line}); point to a V-JEPA pretraining .pt/.pth file"
    )


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and len(value) > 0 and all(torch.is_tensor(v) for v in value.values())


def read_encoder_state(path: str | Path, *, key: str | None = None) -> tuple[dict[str, torch.Tensor], str | None]:
    """The encoder's state dict from a checkpoint file, prefixes stripped, and the entry it came from.

    `key` picks an entry of the checkpoint dict; by default `target_encoder`, then `encoder`, then
    the file itself if it is a plain state dict.
    """
    path = Path(path)
    checkpoint = _load_file(path)
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{path}: holds a {type(checkpoint).__name__}, not a checkpoint dict or state dict")
    entries = ", ".join(map(str, checkpoint)) or "none"
    if key is not None:
        if key not in checkpoint:
            raise CheckpointError(f"{path}: has no entry {key!r}; its entries are: {entries}")
        state, source_key = checkpoint[key], key
    else:
        source_key = next((k for k in ENCODER_KEYS if k in checkpoint), None)
        state = checkpoint[source_key] if source_key else checkpoint
    if not _is_state_dict(state):
        where = f"entry {source_key!r}" if source_key else "file"
        raise CheckpointError(
            f"{path}: the {where} is not a state dict of tensors (entries: {entries}); "
            f"pass key= naming the entry that holds the encoder weights"
        )
    stripped: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        clean = strip_prefixes(name)
        if clean in stripped:
            raise CheckpointError(f"{path}: keys {name!r} and another both become {clean!r} once prefixes are removed")
        stripped[clean] = tensor
    return stripped, source_key


def compare_state(
    state: Mapping[str, torch.Tensor], model: nn.Module, *, path: str = "", source_key: str | None = None
) -> LoadReport:
    """Key-by-key comparison of a (stripped) state dict with `model.state_dict()`."""
    model_state = model.state_dict()
    report = LoadReport(path=str(path), source_key=source_key)
    for name, tensor in state.items():
        if name not in model_state:
            report.unexpected.append(name)
        elif tuple(tensor.shape) != tuple(model_state[name].shape):
            report.mismatched.append((name, tuple(tensor.shape), tuple(model_state[name].shape)))
        else:
            report.loaded.append(name)
    report.missing = [name for name in model_state if name not in state]
    return report


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def inspect_checkpoint(path: str | Path, encoder: nn.Module, *, key: str | None = None) -> LoadReport:
    """How the checkpoint at `path` fits `encoder`, without loading it or raising on mismatches.

    Example:
        >>> print(inspect_checkpoint("vitl.pt", build_encoder("vit_large", img_size=256)).summary())  # doctest: +SKIP
    """
    state, source_key = read_encoder_state(path, key=key)
    return compare_state(state, encoder, path=str(path), source_key=source_key)


def load_encoder_checkpoint(
    path: str | Path,
    encoder: nn.Module,
    *,
    key: str | None = None,
    allow_missing: Sequence[str] = (),
    allow_unexpected: Sequence[str] = (),
) -> LoadReport:
    """Load the encoder weights at `path` into `encoder` in place, strictly.

    Any missing, unexpected or shape-mismatched key raises `CheckpointMismatchError` (nothing is
    loaded then), unless a pattern names it: `allow_missing` (fnmatch patterns of model keys that
    may keep the model's own values, whether absent from the checkpoint or present with another
    shape, e.g. a sin-cos `pos_embed` for another grid) and `allow_unexpected` (checkpoint keys
    to ignore).

    Example:
        >>> encoder = build_encoder("vit_large", img_size=256, in_chans=1)  # doctest: +SKIP
        >>> load_encoder_checkpoint("vitl.pt", encoder, allow_unexpected=["mask_token"])  # doctest: +SKIP
    """
    state, source_key = read_encoder_state(path, key=key)
    report = compare_state(state, encoder, path=str(path), source_key=source_key)
    blocking = LoadReport(
        path=report.path,
        source_key=report.source_key,
        loaded=report.loaded,
        missing=[name for name in report.missing if not _matches(name, allow_missing)],
        unexpected=[name for name in report.unexpected if not _matches(name, allow_unexpected)],
        mismatched=[entry for entry in report.mismatched if not _matches(entry[0], allow_missing)],
    )
    if not blocking.ok:
        raise CheckpointMismatchError(
            f"{blocking.summary(limit=20)}\ncheckpoint does not match the encoder: fix the encoder's config (size, "
            "patch_size, tubelet_size, in_chans, use_rope) or name these keys in allow_missing / allow_unexpected",
            report,
        )
    # Only name- and shape-matched tensors go in; everything else was allowed above.
    encoder.load_state_dict({name: state[name] for name in report.loaded}, strict=False)
    return report
