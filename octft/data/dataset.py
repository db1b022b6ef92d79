"""The data a config names, audited and prepared: from an audit's volume table to each split's pack.

Every trial of a sweep reads prepared arrays from the cache instead of decoding DICOM again. A
volume that fails to decode is counted and reported by `prepare_volumes`, and the dataset is built only
from the volumes that have a cache entry. Each split is read from a pack (`volume_pack`) whose dtype is
`data.pack_dtype` (`resolve_pack_dtype`); batches leave the host in that dtype and the model converts
them to float32 on the device (`octft.models.encoder.input_as_float`). `prepare_data` does it all for a
config's `data` section, refusing data whose audit failed. No torch here: the samples are
`octft.data.samples`, and a launch prepares the data without importing it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Callable, Literal, Sequence, get_args

import numpy as np
import pandas as pd

from octft.data.audit import AuditReport, audit_dataset, participants_per_class, split_class_guards
from octft.data.cache import CacheReport, StorageDtype, VolumeCache
from octft.data.pack import Pack, open_pack, write_pack
from octft.data.prepare import GB, PrepareItem, default_workers, plan_preparation, stream_prepare, take_share
from octft.data.storage import open_storage
from octft.data.preprocess import Preprocessing
from octft.data.readers import read_volume
from octft.errors import OctftError, UsageError

if TYPE_CHECKING:
    from octft.data.samples import VolumeDataset

PackDtype = Literal["auto", "uint8", "float16", "float32"]
# Intensities that map every clip into [0, 1], so that uint8 can store round(x * 255).
UNIT_RANGE_INTENSITIES = ("percentile", "minmax")


def _known(value: object) -> str | None:
    """`value` as text, or None when it says nothing (None, NaN from a table, an empty string)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return text or None


def source_id(uri: str, key: str, size: int, version: object, sha1: object = None) -> str:
    """Identity of a source object from its listing: where it is, its size, its version (a B2 file id,
    a local modification time in ns) and its content SHA-1 where known. Any of them changes when the
    object does, so its cache entry does too; the object's bytes are never needed.

    >>> source_id("b2://bucket/aireadi", "retinal_oct/a.dcm", 1024, "4_z27c88f1d", "da39a3ee")
    'b2://bucket/aireadi/retinal_oct/a.dcm|1024|4_z27c88f1d|da39a3ee'
    """
    version_text = _known(version)
    if version_text is None:
        raise ValueError(f"source {uri.rstrip('/')}/{key} has no version in its listing; list it again")
    parts = [f"{uri.rstrip('/')}/{key}", str(int(size)), version_text]
    sha1_text = _known(sha1)
    if sha1_text is not None:
        parts.append(sha1_text)
    return "|".join(parts)


def _load(storage, keep: bool, budget_bytes: int, key: str):
    try:
        return read_volume(storage.local_path(key), name=f"{storage.uri.rstrip('/')}/{key}")
    finally:
        # A rebuild during training follows data.download.keep / budget_gb, as the preparation did.
        storage.release_download(key, keep=keep, budget_bytes=budget_bytes)


@dataclass
class PreparedVolumes:
    """The volumes a run uses, each with its cache identity. `report` says what failed to build."""

    volumes: pd.DataFrame  # the audit's volume table plus a `source_id` column, failed ones removed
    cache: VolumeCache
    report: CacheReport
    storage: object = None  # where the sources live, so an entry lost after the build is rebuilt
    failed_volumes: pd.DataFrame | None = None  # the rows of the audit's table that failed to build
    # Each split's pack, once opened: a warm trial runner verifies it once, not once per trial.
    packs: dict[str, Pack] = field(default_factory=dict, repr=False)
    pack_dtype: PackDtype = "auto"  # `data.pack_dtype`, resolved per split by `resolve_pack_dtype`
    keep_downloads: bool = False  # `data.download.keep`: a rebuild keeps its raw copy within the budget
    download_budget_bytes: int = 0

    def dataset(self, split: str) -> VolumeDataset:
        """The samples of one split (`train`, `val` or `test`), read from the split's pack.

        The pack (one memory-mapped array of the split's clips, see `octft.data.pack`) is opened, its
        checksums verified once, or written from the cache entries when there is none or it is damaged;
        an entry that went missing or bad since the build is rebuilt from the source on the way.
        """
        return self._dataset(split, self.volumes[self.volumes.split == split])

    def run_datasets(self, inner_val_fraction: float | None = None, seed: int = 0) -> tuple[VolumeDataset, VolumeDataset]:
        """The (training, validation) samples of a run: the train and val splits, or with `inner_val_fraction` the
        training participants cut in two (`inner_validation`), the val split then not read at all."""
        if not inner_val_fraction:
            return self.dataset("train"), self.dataset("val")
        train = self.volumes[self.volumes.split == "train"]
        held_out = train.participant_id.isin(inner_validation(train, inner_val_fraction, seed))
        return self._dataset("train-inner", train[~held_out]), self._dataset("val-inner", train[held_out])

    def _dataset(self, name: str, volumes: pd.DataFrame) -> VolumeDataset:
        volumes = volumes.reset_index(drop=True)
        load = (partial(_load, self.storage, self.keep_downloads, self.download_budget_bytes)
                if self.storage is not None else None)
        if name not in self.packs:
            self.packs[name] = volume_pack(self.cache, volumes, load, pack_dtype=self.pack_dtype)
        # torch comes with the samples, not with the preparation: a launch prepares data without it.
        from octft.data.samples import VolumeDataset

        return VolumeDataset(volumes, self.cache, load=load, pack=self.packs[name])


def inner_validation(train: pd.DataFrame, fraction: float, seed: int) -> set[str]:
    """The training participants held out as an inner validation split: `fraction` of each class (at least one),
    drawn with `seed`; participant-level (all of a participant's volumes go together) and stratified by class.

    >>> table = pd.DataFrame({"participant_id": list("abcdefgh"), "label": [0, 0, 0, 0, 1, 1, 1, 1]})
    >>> sorted(inner_validation(table, 0.25, seed=0))
    ['c', 'h']
    """
    rng = np.random.default_rng(seed)
    held_out: set[str] = set()
    participants = train.drop_duplicates("participant_id")
    for label, members in participants.groupby("label"):
        ids = sorted(members.participant_id.astype(str))
        if len(ids) < 2:
            raise UsageError(f"data.inner_val_fraction: class {label} has {len(ids)} training participant(s); an inner "
                             "validation split needs at least 2 of each class (one to train on, one to validate)")
        rng.shuffle(ids)
        held_out.update(ids[:min(len(ids) - 1, max(1, round(len(ids) * fraction)))])
    return held_out


def resolve_pack_dtype(pack_dtype: PackDtype, cache: VolumeCache, source_ids: Sequence[str]) -> str:
    """The dtype a pack of these sources stores its clips in, for the setting `pack_dtype`.

    "auto" is uint8 when every source decoded to 8 bits (the dtype each cache entry records) and the
    intensity maps clips into [0, 1] (percentile, minmax): uint8 then stores round(x * 255), at most half
    a source grey level off, in a quarter of float32's bytes (half of float16's), which is what bounds
    the input rate (benchmarks/bench_input.py). Otherwise "auto" is the cache's own dtype (float16 by
    default). An explicit dtype is used as it is, except uint8 for zscore clips, which are not in [0, 1].

    >>> resolve_pack_dtype("auto", VolumeCache("c", Preprocessing(intensity="zscore")), ["a"])
    'float16'
    """
    check_pack_dtype(pack_dtype, cache.spec.intensity)
    if pack_dtype != "auto":
        return pack_dtype
    if cache.spec.intensity in UNIT_RANGE_INTENSITIES and source_ids and all(
        _is_8_bit(cache.source_dtype(sid)) for sid in source_ids
    ):
        return "uint8"
    return cache.dtype


def check_pack_dtype(pack_dtype: str, intensity: str) -> None:
    """Refuse a `data.pack_dtype` that cannot hold clips of this intensity normalisation (UsageError)."""
    if pack_dtype not in get_args(PackDtype):
        raise UsageError(f"data.pack_dtype={pack_dtype!r} is unknown: use one of {', '.join(get_args(PackDtype))}")
    if pack_dtype == "uint8" and intensity not in UNIT_RANGE_INTENSITIES:
        raise UsageError(
            f"data.pack_dtype=uint8 cannot hold {intensity} clips (they are not in [0, 1]): use "
            "data.pack_dtype=auto or float16, or data.preprocess.intensity=percentile or minmax"
        )


def _is_8_bit(dtype: str | None) -> bool:
    return dtype is not None and np.dtype(dtype).kind in "biu" and np.dtype(dtype).itemsize == 1


def _as_pack_row(clip: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "uint8":
        # The inverse of the device's x / 255 (input_as_float); clip guards float16 rounding past 1.0.
        return np.rint(np.clip(clip, 0.0, 1.0) * 255).astype(np.uint8)
    return clip


def volume_pack(cache: VolumeCache, volumes: pd.DataFrame, load: Callable[[str], object] | None, *,
                pack_dtype: PackDtype = "auto") -> Pack:
    """The pack of `volumes`' clips under `cache`'s settings: opened when a whole one exists, else written.

    Its dtype (`resolve_pack_dtype`) is part of its key, so another dtype never reuses this pack.
    """
    spec = cache.spec
    ids = volumes.source_id.tolist()
    dtype = resolve_pack_dtype(pack_dtype, cache, ids)
    meta = {"kind": "volumes", "spec": asdict(spec), "cache_dtype": cache.dtype, "dtype": dtype}
    root = cache.root / "packs"
    pack = open_pack(root, meta, ids)
    if pack is not None:
        return pack

    def clips():
        for sid, key in zip(ids, volumes.key):
            if load is not None:
                yield _as_pack_row(cache.get_or_build(sid, partial(load, key)), dtype)
                continue
            clip = cache.get(sid)
            if clip is None:
                raise FileNotFoundError(f"no valid cache entry for {sid}: run `octft data cache` again")
            yield _as_pack_row(clip, dtype)

    return write_pack(root, meta, ids, clips(), row_shape=(spec.frames, spec.height, spec.width), dtype=dtype)


def prepare_volumes(
    uri: str,
    volumes: pd.DataFrame,
    *,
    cache_dir: str,
    frames: int,
    height: int,
    width: int,
    intensity: str = "percentile",
    dtype: StorageDtype = "float16",
    pack_dtype: PackDtype = "auto",
    workers: int | None = None,
    keep: bool = False,
    budget_gb: float = 0.0,
    download_dir: str | None = None,
    share: tuple[int, int] | None = None,
    progress: bool = True,
    storage=None,
    decode: str = "auto",
) -> PreparedVolumes:
    """Prepare every volume of an audit into the cache (`octft data cache`; each training run too).

    Streams (see `octft.data.prepare`): plans first and refuses with PlanError, before fetching anything,
    when the disk cannot hold the prepared cache plus the downloads; then fetches, verifies,
    preprocesses and releases each raw file with `workers` at a time (default: one per core). With
    `share=(i, n)` only every n-th volume from the i-th is prepared (hosts preparing one shared cache
    together); `volumes` keeps them all. `decode` says where volumes are decoded (`stream_prepare`).
    Volumes that fail are counted in `report.failed` with their
    reason and left out of `volumes`. `pack_dtype` is the dtype of each split's pack (`resolve_pack_dtype`).
    The keyword arguments are `DataConfig.prepare_kwargs()`.
    """
    check_pack_dtype(pack_dtype, intensity)  # before any work
    if storage is None:
        storage = open_storage(uri, cache_dir=download_dir)
    workers = workers or default_workers()
    cache = VolumeCache(cache_dir, Preprocessing(frames=frames, height=height, width=width, intensity=intensity),
                        dtype=dtype)
    versions = volumes["version"] if "version" in volumes else [None] * len(volumes)
    items = [
        PrepareItem(key, int(size), source_id(storage.uri, key, size, _known(version) or storage.info(key).version, sha1))
        for key, size, sha1, version in zip(volumes.key, volumes["size"], volumes.sha1, versions)
    ]
    mine = take_share(items, share)
    plan = plan_preparation(storage, cache, mine, workers=workers, keep=keep, budget_gb=budget_gb,
                            download_dir=download_dir)
    if progress:
        print(plan.describe(), flush=True)
    plan.check()
    report = stream_prepare(storage, cache, mine, workers=workers, keep=keep, budget_gb=budget_gb, progress=progress,
                            decode=decode)
    failed = {sid for sid, _ in report.failed}
    prepared = volumes.assign(source_id=[item.source_id for item in items])
    lost = prepared.source_id.isin(failed)
    return PreparedVolumes(prepared[~lost].reset_index(drop=True), cache, report, storage,
                           failed_volumes=prepared[lost].reset_index(drop=True), pack_dtype=pack_dtype,
                           keep_downloads=keep, download_budget_bytes=int(budget_gb * GB) if keep else 0)


class AuditFailedError(OctftError, RuntimeError):
    """Training refuses data whose audit failed, unless the failed guards are allowed by name."""


@dataclass
class DataSetup:
    """A run's audited data and prepared cache, for one set of data settings."""

    report: AuditReport
    prepared: PreparedVolumes


def audited_data(data):
    """Audit the data a config's `data` section names; refuse it when a guard failed that it does not allow."""
    report = audit_dataset(**data.audit_kwargs())
    failed = report.failed_guards(data.allow_failed_guards)
    if failed:
        names = ", ".join(guard.name for guard in failed)
        raise AuditFailedError(
            f"data audit of {data.uri} failed ({'; '.join(f'{g.name}: {g.detail}' for g in failed)}); run `octft "
            f"data audit --data {data.uri}` for the full report, or override on purpose with "
            f"data.allow_failed_guards=[{names}]"
        )
    return report


def prepare_data(data, *, progress: bool) -> DataSetup:
    """Audit the data a config names (refusing failed guards) and make sure its cache is complete."""
    report = audited_data(data)
    prepared = prepare_volumes(volumes=report.volumes, progress=progress, **data.prepare_kwargs())
    if prepared.report.failed:
        print(f"{len(prepared.report.failed)} volumes could not be read and are left out:")
        for source, reason in prepared.report.failed:
            print(f"  {source}: {reason}")
        check_after_cache(data, prepared)
    return DataSetup(report, prepared)


def check_after_cache(data, prepared) -> None:
    """The audit's split guards again, on the volumes that survived the cache.

    A volume that failed to decode at cache time can empty a class of a split the audit saw full; validation
    would then average over fewer classes without saying so. Refused like the audit refuses, naming the files.
    """
    guards = split_class_guards(participants_per_class(prepared.volumes), data.audit_kwargs()["min_per_class"])
    failed = [guard for guard in guards if not guard.passed and guard.name not in set(data.allow_failed_guards)]
    if not failed:
        return
    reasons = dict(prepared.report.failed)
    lost = prepared.failed_volumes
    lost = lost[lost.split.isin([guard.name.removeprefix("classes_in_") for guard in failed])]
    files = [f"{row.key} ({row.split}, {row.class_name}): {reasons[row.source_id]}" for row in lost.itertuples(index=False)]
    names = ", ".join(guard.name for guard in failed)
    raise AuditFailedError(
        f"after the cache, {'; '.join(guard.detail for guard in failed)}: volumes that failed to decode left the split "
        f"short ({'; '.join(files[:10])}{' ...' if len(files) > 10 else ''}); fix or replace those files, or override "
        f"on purpose with data.allow_failed_guards=[{names}]"
    )


def data_manifest_hash(volumes) -> str:
    """A hash of exactly what a run trains and validates on: keys, content identity, label and split."""
    digest = hashlib.sha256()
    for row in volumes.sort_values("key").itertuples(index=False):
        digest.update(f"{row.key}|{row.source_id}|{row.label}|{row.split}\n".encode())
    return digest.hexdigest()[:16]
