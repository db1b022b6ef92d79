"""Typed experiment configuration: YAML in, validated models out.

Only this module and the CLI see config objects; components take flat, typed arguments whose names
equal the config keys. Unknown or misspelled keys are errors that name the key and the valid ones.
Every YAML a user hands octft (experiments, sweeps, the report's definition, override values) is parsed by
`read_yaml` / `parse_yaml`, which refuse anchors and aliases before anything is expanded.

    >>> cfg = load_experiment_dict({"data": {"uri": "/data/aireadi"}, "model": {"checkpoint": "scratch"}},
    ...                            overrides=["train.epochs=5"])
    >>> cfg.train.epochs, cfg.data.labels_uri, cfg.model.pretrained
    (5, '/data/aireadi/participants.tsv', None)
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from octft.data.layout import LABELS_KEY
from octft.io import file_kind
from octft.errors import OctftError
from octft.redaction import redact_text


class ConfigError(OctftError, ValueError):
    """A configuration that cannot be used; the message names the file, key and valid choices."""


# User YAML (experiments, sweeps, the report's definition) is a few KB; a larger file is not one of them.
MAX_YAML_BYTES = 1 << 20
# model.checkpoint's word for a randomly initialised encoder: every experiment says which it trains.
SCRATCH = "scratch"
# NumPy's and torch's generators take seeds in [0, 2**32); a seed outside fails only once training starts.
SEED_LIMIT = 2**32


class _AliasFound(Exception):
    def __init__(self, event) -> None:
        sign = "*" if isinstance(event, yaml.AliasEvent) else "&"
        super().__init__(f"line {event.start_mark.line + 1}: the YAML {'alias' if sign == '*' else 'anchor'} "
                         f"{sign}{event.anchor}")


class _NoAliasLoader(yaml.SafeLoader):
    """Safe YAML without anchors and aliases: nested aliases (a "billion laughs" file) would expand a 1 KB file
    to gigabytes in any plain-types copy of the tree; octft's YAML never needs them, so they are refused while
    parsing, before anything is expanded."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _AliasFound(event)
        return super().compose_node(parent, index)


def parse_yaml(text: str, *, source: str) -> Any:
    """YAML text -> plain values (dicts, lists, scalars); anchors and aliases refused, `source` named in errors.

    >>> parse_yaml("train: {epochs: 3}", source="<example>")
    {'train': {'epochs': 3}}
    """
    try:
        return yaml.load(text, Loader=_NoAliasLoader)
    except _AliasFound as found:
        raise ConfigError(f"{source}: {found}: octft does not expand YAML anchors and aliases (nested ones grow a "
                          "small file to gigabytes); write the values out in full") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: not valid YAML ({' '.join(str(error).split())})") from None
    except RecursionError:
        raise ConfigError(f"{source}: YAML nested too deeply to be a config; flatten it") from None


def read_yaml(path: str | Path, *, what: str) -> Any:
    """The plain values of the YAML file `path` (a `what`, e.g. "experiment file", for the messages).

    Every user YAML octft reads comes through here: a missing file, a FIFO, device or folder, a file over
    `MAX_YAML_BYTES`, text that is not UTF-8, invalid YAML and anchors/aliases are each one `ConfigError`.
    """
    path = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO would otherwise wait for a writer; its kind is refused below.
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such {what}") from None
    except (OSError, ValueError) as error:  # unreadable, or a NUL byte in the name
        raise ConfigError(f"{path}: cannot open the {what} ({getattr(error, 'strerror', None) or error})") from None
    mode = os.fstat(descriptor).st_mode  # checked on the opened file, not the name: nothing can be swapped in
    if not stat.S_ISREG(mode):
        os.close(descriptor)
        raise ConfigError(f"{path}: is {file_kind(mode)}, not a regular file; give the path of the {what}")
    with os.fdopen(descriptor, "rb") as file:
        try:
            data = file.read(MAX_YAML_BYTES + 1)
        except OSError as error:
            raise ConfigError(f"{path}: cannot read the {what} ({error.strerror or error})") from None
    if len(data) > MAX_YAML_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_YAML_BYTES} bytes, too large for a {what}; is it the right file?")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: cannot read it as YAML text (not UTF-8); give the {what}") from None
    return parse_yaml(text, source=str(path))


class _Strict(BaseModel):
    # allow_inf_nan=False: an infinite or NaN learning rate, threshold or fraction is never meant.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _refuse_bool(value: Any) -> Any:
    # pydantic reads `true` as 1 in a number field, so `train.epochs=true` would train one epoch.
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got the boolean {str(value).lower()}")
    return value


Int = Annotated[int, BeforeValidator(_refuse_bool)]
Float = Annotated[float, BeforeValidator(_refuse_bool)]
Beta = Annotated[float, BeforeValidator(_refuse_bool), Field(ge=0, lt=1)]


def _check_seed(value: Any) -> Any:
    value = _refuse_bool(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not 0 <= value < SEED_LIMIT:
        raise ValueError(f"a seed is an integer from 0 to {SEED_LIMIT - 1} (2**32 - 1)")
    return value


Seed = Annotated[int, BeforeValidator(_check_seed)]


class SelectionConfig(_Strict):
    """Which located volumes a run uses; everything else is counted as excluded, with the rule."""

    regions: list[str] | None = ["macula"]
    devices: list[str] | None = None
    lateralities: list[Literal["L", "R"]] | None = None
    # "all": every volume of a participant; "one_per_eye": one volume per participant and eye, chosen by
    # device order (the `devices` list, else the layout's order), then most frames, then key.
    per_participant: Literal["all", "one_per_eye"] = "all"


class GuardConfig(_Strict):
    """Thresholds of the audit's guards. A failed guard stops `octft data audit` and training."""

    min_match_rate: Float = Field(0.9, ge=0, le=1)
    min_per_class: Int = Field(1, ge=0)
    max_duplicate_files: Int = Field(0, ge=0)


class SplitConfig(_Strict):
    """Used only when the labels have no `recommended_split`: a seeded, class-stratified split by participant."""

    val_fraction: Float = Field(0.15, gt=0, lt=1)
    test_fraction: Float = Field(0.15, gt=0, lt=1)
    seed: Seed = 0

    @model_validator(mode="after")
    def _leaves_train(self) -> "SplitConfig":
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"data.split.val_fraction + data.split.test_fraction is {self.val_fraction + self.test_fraction:g}: "
                "nothing would be left to train on; keep their sum below 1"
            )
        return self


class PreprocessConfig(_Strict):
    frames: Int = Field(16, ge=1)
    height: Int = Field(224, ge=8)
    width: Int = Field(224, ge=8)
    intensity: Literal["zscore", "minmax", "percentile"] = "percentile"


class DownloadConfig(_Strict):
    """How `octft data cache` (and a run that must prepare) fetches sources: streamed, each raw file
    deleted once prepared unless `keep`; see docs/data.md, "Preparing a full release from B2"."""

    workers: int | None = Field(None, ge=1)  # downloads and decodes at once; default: the machine's cores
    keep: bool = False  # keep raw downloads for next time, least recently used evicted beyond budget_gb
    budget_gb: float = Field(20.0, ge=0)  # disk for kept downloads (only with keep)
    dir: str | None = None  # where downloads land; default $OCTFT_CACHE_DIR/b2, else ~/.cache/octft/b2


class DataConfig(_Strict):
    uri: str = "demo/data"
    labels: str | None = None  # default: participants.tsv under `uri`
    use_manifest: bool = True
    verify: bool = False  # decode every selected file during the audit (catches truncated files)
    selection: SelectionConfig = SelectionConfig()
    guards: GuardConfig = GuardConfig()
    split: SplitConfig = SplitConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    cache_dir: str = ".octft-cache"
    cache_dtype: Literal["float16", "float32"] = "float16"  # how prepared clips are stored
    # How each split's pack stores clips (octft.data.dataset.resolve_pack_dtype): auto is uint8 when every
    # source decoded to 8 bits and the intensity is percentile or minmax, else cache_dtype.
    pack_dtype: Literal["auto", "uint8", "float16", "float32"] = "auto"
    # Validate on an inner split of the training participants (this fraction of each class, seeded by data.split.seed)
    # instead of the validation split, which the run then never reads: a probe study that picks LP-FT's head this
    # way leaves the validation split to the LP-FT study's selection alone (docs/sweeps.md, "Honest numbers").
    inner_val_fraction: Float | None = Field(None, gt=0, lt=1)
    download: DownloadConfig = DownloadConfig()
    allow_failed_guards: list[str] = []  # guard names a user overrides on purpose

    @model_validator(mode="after")
    def _pack_dtype_fits_intensity(self) -> "DataConfig":
        # The same rule as octft.data.dataset.check_pack_dtype, refused here before anything runs.
        if self.pack_dtype == "uint8" and self.preprocess.intensity == "zscore":
            raise ValueError(
                "data.pack_dtype=uint8 cannot hold zscore clips (they are not in [0, 1]): use data.pack_dtype=auto "
                "or float16, or data.preprocess.intensity=percentile or minmax"
            )
        return self

    def audit_kwargs(self) -> dict[str, Any]:
        """The flat arguments of `octft.data.audit.audit_dataset` that this section sets."""
        return dict(
            uri=self.uri,
            labels=self.labels,
            use_manifest=self.use_manifest,
            verify=self.verify,
            regions=self.selection.regions,
            devices=self.selection.devices,
            lateralities=self.selection.lateralities,
            per_participant=self.selection.per_participant,
            min_match_rate=self.guards.min_match_rate,
            min_per_class=self.guards.min_per_class,
            max_duplicate_files=self.guards.max_duplicate_files,
            val_fraction=self.split.val_fraction,
            test_fraction=self.split.test_fraction,
            split_seed=self.split.seed,
        )

    def prepare_kwargs(self) -> dict[str, Any]:
        """The flat arguments of `octft.data.dataset.prepare_volumes` that this section sets."""
        return dict(
            uri=self.uri,
            cache_dir=self.cache_dir,
            dtype=self.cache_dtype,
            pack_dtype=self.pack_dtype,
            workers=self.download.workers,
            keep=self.download.keep,
            budget_gb=self.download.budget_gb,
            download_dir=self.download.dir,
            **self.preprocess.model_dump(),
        )

    @property
    def labels_uri(self) -> str:
        if self.labels:
            return self.labels
        return self.uri.rstrip("/") + "/" + LABELS_KEY


class ModelConfig(_Strict):
    size: str = "vit_base"
    patch_size: Int = Field(16, ge=1)
    tubelet_size: Int = Field(2, ge=1)
    in_chans: Int = Field(1, ge=1)
    use_rope: bool = True
    rope_layout: Literal["vjepa2", "interleaved"] = "vjepa2"
    drop_path_rate: Float = Field(0.0, ge=0, lt=1)
    norm_eps: Float = Field(1e-6, gt=0)  # V-JEPA's named sizes use 1e-6
    head: Literal["mlp", "attentive", "linear"] = "mlp"
    head_hidden_features: Int = Field(256, ge=1)
    head_dropout: Float = Field(0.1, ge=0, lt=1)
    # The pretrained encoder's checkpoint file, or SCRATCH. Every experiment file must name one or the other
    # (load_experiment); None, in configs built in code or from a dict, means scratch.
    checkpoint: str | None = None
    checkpoint_key: str | None = None  # default: target_encoder, falling back to encoder
    allow_missing: list[str] = []
    allow_unexpected: list[str] = []

    @field_validator("checkpoint")
    @classmethod
    def _path_or_scratch(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError(f"give the pretrained checkpoint's path or the word {SCRATCH!r}, not an empty string")
        return value

    @property
    def pretrained(self) -> str | None:
        """The checkpoint to load into the encoder, or None for a randomly initialised one."""
        return None if self.checkpoint in (None, SCRATCH) else self.checkpoint


class ObjectiveConfig(_Strict):
    """The one figure a run is judged by: it picks the best epoch, drives early stopping, decides `best.pt`,
    and (in a sweep) ranks trials and promotion. Any participant-level validation metric (`val/...`)."""

    metric: str = "val/balanced_accuracy"
    direction: Literal["maximize", "minimize"] = "maximize"

    @field_validator("metric")
    @classmethod
    def _validation_metric(cls, value: str) -> str:
        if not value.startswith("val/"):
            raise ValueError(
                f"{value!r} is not a validation metric; use a val/... metric such as val/balanced_accuracy, "
                "val/macro_f1, val/auc_macro or val/loss"
            )
        return value


class TrainConfig(_Strict):
    epochs: Int = Field(20, ge=1)
    batch_size: Int = Field(4, ge=1)  # per optimizer micro-batch, global over all devices
    accumulation_steps: Int = Field(4, ge=1)
    # null: the encoder never unfreezes (a probe run: only the head trains).
    unfreeze_epoch: Int | None = Field(3, ge=0)
    clip_norm: Float | None = Field(1.0, gt=0)  # null: no clipping
    # Counted only over epochs with a trainable encoder; null: no early stopping.
    early_stopping_patience: Int | None = Field(5, ge=1)
    objective: ObjectiveConfig = ObjectiveConfig()
    seed: Seed = 0
    # Background threads that gather batches from the pack ahead of the step; 0: gathered when the step
    # asks for them. Threads, not processes: a pack's memory-map copies release the GIL.
    num_workers: Int = Field(1, ge=0)

    @model_validator(mode="after")
    def _unfreezes_in_time(self) -> "TrainConfig":
        if self.unfreeze_epoch is not None and self.unfreeze_epoch >= self.epochs:
            raise ValueError(
                f"train.unfreeze_epoch ({self.unfreeze_epoch}) must be below train.epochs ({self.epochs}), or the "
                "encoder never trains; for a run that never unfreezes on purpose set train.unfreeze_epoch=null"
            )
        return self


class OptimConfig(_Strict):
    lr_head: Float = Field(3e-3, gt=0)
    lr_encoder: Float = Field(1e-5, gt=0)
    weight_decay: Float = Field(0.05, ge=0)
    warmup_epochs: Float = Field(1.0, ge=0)
    min_lr_ratio: Float = Field(0.01, ge=0, le=1)
    betas: tuple[Beta, Beta] = (0.9, 0.999)  # each in [0, 1), as AdamW requires


class LossConfig(_Strict):
    label_smoothing: Float = Field(0.05, ge=0, lt=1)
    class_weights: Literal["balanced", "none"] = "balanced"


class RuntimeConfig(_Strict):
    kind: Literal["auto", "xla", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    # torch_xla's persistent compilation cache, shared by every trial process on a host (TPU only); null: off.
    compile_cache_dir: str | None = "~/.cache/octft/xla"
    # Rows each device holds per micro-batch; null: the most, up to train.batch_size, that divide its share of
    # the effective batch. A sweep on XLA fixes it for all its trials, so that they share compiled graphs.
    micro_batch_rows: Int | None = Field(None, ge=1)


class TrackingConfig(_Strict):
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str = "octft"
    run_name: str | None = None
    # Log the volume-level scores (val_volume/*, a third of an epoch's values) every epoch beside the participant-level
    # ones (val/*, what runs are selected on). A probe study of many short heads turns them off.
    volume_metrics: bool = True


class FeaturesConfig(_Strict):
    """The frozen-feature store: while the encoder is frozen, the head trains on its stored outputs.

    Pooled features serve the mlp and linear heads; the attentive head needs token sequences (about
    2.4 MB per ViT-B volume), stored only with `tokens: true`, else its frozen epochs run the encoder.
    """

    enabled: bool = True
    dir: str = ".octft-features"
    tokens: bool = False


class InitConfig(_Strict):
    """Where the head's starting weights come from (LP-FT): `runs:/<MLflow run id>` (that run's best
    checkpoint), or a probe sweep file whose best trial is resolved to its run once, when the study launches."""

    head_from: str | None = None


class ExperimentConfig(_Strict):
    name: str = "experiment"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    optim: OptimConfig = OptimConfig()
    loss: LossConfig = LossConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    tracking: TrackingConfig = TrackingConfig()
    features: FeaturesConfig = FeaturesConfig()
    init: InitConfig = InitConfig()
    output_dir: str = "runs"

    @model_validator(mode="after")
    def _warms_up_within_the_run(self) -> "ExperimentConfig":
        if self.optim.warmup_epochs > self.train.epochs:
            raise ValueError(
                f"optim.warmup_epochs ({self.optim.warmup_epochs:g}) is longer than the run, train.epochs "
                f"({self.train.epochs}): the learning rate would never reach its peak; lower optim.warmup_epochs "
                "or raise train.epochs"
            )
        return self

    def flat(self) -> dict[str, Any]:
        """Every resolved value under its dotted path, e.g. {'optim.lr_head': 0.003, ...}."""
        return flatten(self.model_dump(mode="json"))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`"optim.lr_head=1e-3"` -> (["optim", "lr_head"], 0.001). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value (example: optim.lr_head=1e-3)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    value = parse_yaml(raw, source=f"override {text!r}") if raw.strip() else None
    # YAML reads "1e-3" as a string (no dot in the mantissa); numbers are what people mean.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return key.split("."), value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = tree
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return tree


def _valid_keys(model: type[BaseModel], path: tuple) -> list[str]:
    for part in path:
        field = model.model_fields.get(str(part))
        if field is None:
            break
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            break
    return sorted(model.model_fields)


def _explain(error: ValidationError, model: type[BaseModel], source: str) -> ConfigError:
    lines = []
    for item in error.errors():
        loc = tuple(item["loc"])
        dotted = ".".join(str(p) for p in loc)
        if item["type"] == "extra_forbidden":
            parent = ".".join(str(p) for p in loc[:-1]) or "<top level>"
            valid = ", ".join(_valid_keys(model, loc[:-1]))
            lines.append(f"unknown key {dotted!r}; valid keys under {parent}: {valid}")
        elif item["type"] == "value_error" and isinstance(item.get("input"), dict):
            # A rule across keys of a section: its message names the keys; the section's values are noise.
            lines.append(str(item["ctx"]["error"]))
        else:
            lines.append(f"{dotted}: {item['msg']} (got {item.get('input')!r})")
    return ConfigError(f"{source}: " + "; ".join(lines))


def load_experiment_dict(tree: dict[str, Any], overrides: list[str] | None = None, *, source: str = "<config>") -> ExperimentConfig:
    tree = json.loads(json.dumps(tree or {}))  # deep copy, plain types
    apply_overrides(tree, list(overrides or []))
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as error:
        raise _explain(error, ExperimentConfig, source) from None


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read an experiment YAML and apply dotted `key=value` overrides.

    The file must say what the encoder starts from: a missing or null model.checkpoint once trained a randomly
    initialised ViT-B without a word, so both are refused.
    """
    tree = read_yaml(path, what="experiment file") or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (data, model, train, ...), got {type(tree).__name__}")
    config = load_experiment_dict(tree, overrides, source=str(path))
    if config.model.checkpoint is None:
        raise ConfigError(
            f"{path}: model.checkpoint is not set (missing or null); set it to the pretrained encoder's checkpoint "
            f"file (model.checkpoint=/path/to/vjepa2_oct_vitb.pt) or to the word {SCRATCH} to train a randomly "
            "initialised encoder"
        )
    return config


def resolved_record(config: ExperimentConfig) -> str:
    """The resolved config as JSON text, every URL's password hidden: what a checkpoint carries to rebuild its model
    (`load_experiment_dict(json.loads(text))` reads it back)."""
    return json.dumps(json.loads(json.dumps(config.model_dump(mode="json")), object_hook=_hide_passwords))


def save_resolved(config: ExperimentConfig, path: str | Path) -> None:
    """The resolved config as YAML, every URL's password hidden (a run folder and its artifacts carry no secret)."""
    Path(path).write_text(yaml.safe_dump(json.loads(resolved_record(config)), sort_keys=False))


def _hide_passwords(section: dict[str, Any]) -> dict[str, Any]:
    return {key: redact_text(value) if isinstance(value, str) else value for key, value in section.items()}
