"""What a run is built from, wired from its config: audited and prepared data, the model, the frozen features.

Each piece is made by one function from the config, and `RunCache` keeps the last one of each kind between the
runs of a warm trial runner, keyed by every setting that decides it: trials that share data settings audit and
check the cache once; trials that share an encoder build it (and read its checkpoint) once and draw their heads
from the same random state; trials that share a feature key open and check the stored features once. A trial
that samples a key of any of these gets its own: nothing is built once for a whole study.

    >>> cache = RunCache()
    >>> setup = cache.data(cfg.data, progress=False)                            # doctest: +SKIP
    >>> model, report = cache.model(cfg, trains_encoder=True)                   # doctest: +SKIP
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch

from octft.config import ExperimentConfig
from octft.data.dataset import DataSetup, prepare_data
from octft.data.layout import CLASS_SHORT_NAMES
from octft.features.frozen import FrozenFeatures, frozen_features
from octft.features.store import STORAGE_DTYPE, FeatureKey, FeaturePlan, FeatureStore
from octft.models import Classifier, build_encoder, build_head
from octft.models.checkpoint import load_encoder_checkpoint
from octft.train.losses import balanced_class_weights
from octft.train.provenance import encoder_identity


def class_weights_for(cfg: ExperimentConfig, train_set) -> torch.Tensor | None:
    """`loss.class_weights`: `balanced` (n / (classes x count) over the training rows) or None."""
    if cfg.loss.class_weights != "balanced":
        return None
    return balanced_class_weights(train_set.labels.tolist(), len(CLASS_SHORT_NAMES))


def build_encoder_for(cfg: ExperimentConfig):
    """The encoder `cfg.model` names, with its checkpoint loaded; (encoder, load report or None)."""
    pre, model = cfg.data.preprocess, cfg.model
    encoder = build_encoder(
        model.size, img_size=(pre.height, pre.width), patch_size=model.patch_size, num_frames=pre.frames,
        tubelet_size=model.tubelet_size, in_chans=model.in_chans, use_rope=model.use_rope,
        rope_layout=model.rope_layout, drop_path_rate=model.drop_path_rate, norm_eps=model.norm_eps,
    )
    report = None
    if model.pretrained:
        report = load_encoder_checkpoint(model.pretrained, encoder, key=model.checkpoint_key,
                                         allow_missing=model.allow_missing, allow_unexpected=model.allow_unexpected)
    return encoder, report


def build_model_head(cfg: ExperimentConfig, in_features: int, num_classes: int = len(CLASS_SHORT_NAMES)):
    """The head `cfg.model` names (drawing its initial weights from torch's RNG, right after the encoder's)."""
    kwargs = {}
    if cfg.model.head == "mlp":
        kwargs = {"hidden_features": cfg.model.head_hidden_features, "dropout": cfg.model.head_dropout}
    return build_head(cfg.model.head, in_features, num_classes, **kwargs)


def build_model(cfg: ExperimentConfig, num_classes: int = len(CLASS_SHORT_NAMES)):
    """(Classifier, checkpoint load report or None), drawn from torch's RNG as it stands."""
    encoder, report = build_encoder_for(cfg)
    return Classifier(encoder, build_model_head(cfg, encoder.num_features, num_classes)), report


def feature_key(cfg: ExperimentConfig, encoder_identity: str, precision: str, train_set, val_set, kind: str) -> FeatureKey:
    """The store key of a run's frozen-encoder features: every input that decides their numbers."""
    model = cfg.model
    encoder = encoder_identity
    if model.pretrained and model.allow_missing:
        encoder += f"+seed={cfg.train.seed}"  # parameters the checkpoint lacks keep their seeded init
    # The head's settings and the checkpoint's path do not change the encoder's outputs; its content does.
    encoder_config = model.model_dump(mode="json", exclude={"head", "head_hidden_features", "head_dropout", "checkpoint"})
    return FeatureKey(encoder=encoder, model=encoder_config, precision=precision,
                      preprocessing={**cfg.data.preprocess.model_dump(mode="json"), "cache_dtype": cfg.data.cache_dtype,
                                     "pack_dtype": {"train": pack_dtype(train_set), "val": pack_dtype(val_set)}},
                      kind=kind, sources={"train": list(train_set.volumes.source_id), "val": list(val_set.volumes.source_id)})


def pack_dtype(dataset) -> str:
    """The dtype a split's clips reach the encoder in: its pack's (data.pack_dtype resolved), or the cache's."""
    return str(dataset.pack.rows.dtype) if dataset.pack is not None else "cache"


def needs_features(cfg: ExperimentConfig, resume_epoch: int = -1) -> bool:
    """Whether a run trains frozen epochs on stored features (from `resume_epoch` + 1 on)."""
    unfreeze = cfg.train.unfreeze_epoch
    frozen_epochs_left = (unfreeze is None or unfreeze > resume_epoch + 1) and resume_epoch + 1 < cfg.train.epochs
    # Token sequences are large: stored only when asked for (features.tokens=true).
    return cfg.features.enabled and frozen_epochs_left and (cfg.model.head != "attentive" or cfg.features.tokens)


class RunCache:
    """The last data setup, encoder, stored features and LP-FT head made for a run, for the next run to reuse when
    its settings match (a warm trial runner keeps one for its life; `octft train` makes a fresh one). One of each
    kind is kept: trials of a sweep mostly share them, and older ones would only grow the runner's memory."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[Any, Any]] = {}

    def _get(self, kind: str, key: Any, make: Callable[[], Any]) -> Any:
        found = self._last.get(kind)
        if found is None or found[0] != key:
            self._last.pop(kind, None)  # let the old one go before the next is made
            self._last[kind] = (key, make())
        return self._last[kind][1]

    def data(self, data, *, progress: bool) -> DataSetup:
        return self._get("data", data.model_dump_json(), lambda: prepare_data(data, progress=progress))

    def model(self, cfg: ExperimentConfig, *, trains_encoder: bool) -> tuple[Classifier, object]:
        """The run's model as `build_model` after `torch.manual_seed(cfg.train.seed)` makes it: the encoder built
        once per encoder setting, the head drawn from the random state right after it. A run that never trains its
        encoder on the CPU shares the built one; any other gets a copy."""
        key = (cfg.train.seed, encoder_identity(cfg),
               cfg.model.model_dump_json(exclude={"head", "head_hidden_features", "head_dropout"}),
               cfg.data.preprocess.model_dump_json())

        def build():
            torch.manual_seed(cfg.train.seed)
            encoder, report = build_encoder_for(cfg)
            return encoder, report, torch.get_rng_state()

        encoder, report, rng_state = self._get("encoder", key, build)
        shared = not trains_encoder and cfg.runtime.kind == "cpu"
        torch.set_rng_state(rng_state)
        encoder = encoder if shared else copy.deepcopy(encoder)
        return Classifier(encoder, build_model_head(cfg, encoder.num_features)), report

    def features(self, cfg: ExperimentConfig, model, train_set, val_set, runtime, *, resume_epoch: int = -1
                 ) -> FrozenFeatures | None:
        """The stored train / val features of this run's encoder when it has frozen epochs left, else None."""
        if not needs_features(cfg, resume_epoch):
            return None
        kind = "tokens" if cfg.model.head == "attentive" else "pooled"
        key = feature_key(cfg, encoder_identity(cfg), runtime.precision, train_set, val_set, kind)
        # Labels and participants come from the run's volume table, not the store: the data settings are in the key.
        identity = (key.digest(), cfg.data.model_dump_json())
        found = self._last.get("features")
        if found is not None and found[0] == identity:
            return found[1].reused()
        features = stored_features(cfg, key, model, train_set, val_set, runtime)
        self._last["features"] = (identity, features)
        return features

    def head(self, uri: str, load: Callable[[], dict]) -> dict:
        return self._get("head", uri, load)


def stored_features(cfg: ExperimentConfig, key: FeatureKey, model, train_set, val_set, runtime) -> FrozenFeatures:
    """The features of `key` from the store `features.dir`, built with the run's encoder when absent."""
    store = FeatureStore(cfg.features.dir)
    if store.open(key) is None:
        pre = cfg.data.preprocess
        tokens = math.prod(model.encoder.token_grid(pre.frames, pre.height, pre.width))
        width = model.encoder.num_features
        plan = FeaturePlan(key.kind, {"train": len(train_set), "val": len(val_set)},
                           (width,) if key.kind == "pooled" else (tokens, width), STORAGE_DTYPE[key.kind])
        print(f"feature store {store.root}: building {plan.describe()}", flush=True)
    # Evaluation-sized batches the devices share evenly (see Runtime.batch_layout).
    layout = runtime.batch_layout(cfg.train.batch_size, cfg.train.accumulation_steps, cfg.runtime.micro_batch_rows)
    features = frozen_features(store, key, model.encoder, train_set, val_set, runtime=runtime,
                               batch_size=layout.eval_batch_size)
    print(f"features {'built' if features.built else 'reused'}: {features.digest[:12]} ({key.kind}, "
          f"{features.nbytes / 2**20:.1f} MiB, {features.seconds:.1f} s)", flush=True)
    return features
