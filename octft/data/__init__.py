"""The data layer: storage, locator, labels, audit, readers, cache, synthetic data.

    >>> from octft.data import read_volume, audit_dataset
    >>> volume = read_volume("scan.dcm")          # doctest: +SKIP
    >>> volume.array.shape                        # doctest: +SKIP
    (128, 496, 768)
"""

from octft.data.audit import AuditReport, audit, audit_dataset, format_report
from octft.data.ids import canonical_participant_id
from octft.data.labels import Labels, LabelsError, load_labels
from octft.data.locator import Located, OctFile, locate
from octft.data.readers import describe_volume, read_volume
from octft.data.storage import ObjectInfo, Storage, open_storage
from octft.data.volume import OctReadError, Volume

__all__ = [
    "AuditReport", "Labels", "LabelsError", "Located", "ObjectInfo", "OctFile", "OctReadError", "Storage", "Volume",
    "audit", "audit_dataset", "canonical_participant_id", "describe_volume", "format_report", "load_labels", "locate",
    "open_storage", "read_volume",
]
