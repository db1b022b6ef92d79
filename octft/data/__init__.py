"""The data layer: storage, locator, labels, audit, readers, cache, synthetic data.

    >>> from octft.data import read_volume, audit_dataset
    >>> volume = read_volume("scan.dcm")          # doctest: +SKIP
    >>> volume.array.shape                        # doctest: +SKIP
    (128, 496, 768)
"""

import importlib
from typing import Any

# Imported on first use (PEP 562): `octft.data.layout` or `.storage` alone must not pull in pandas.
_HOMES = {
    "AuditReport": "audit", "audit": "audit", "audit_dataset": "audit", "format_report": "audit",
    "canonical_participant_id": "ids",
    "Labels": "labels", "LabelsError": "labels", "load_labels": "labels",
    "Located": "locator", "OctFile": "locator", "locate": "locator",
    "describe_volume": "readers", "read_volume": "readers",
    "ObjectInfo": "storage", "Storage": "storage", "open_storage": "storage",
    "OctReadError": "volume", "Volume": "volume",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)


__all__ = [
    "AuditReport", "Labels", "LabelsError", "Located", "ObjectInfo", "OctFile", "OctReadError", "Storage", "Volume",
    "audit", "audit_dataset", "canonical_participant_id", "describe_volume", "format_report", "load_labels", "locate",
    "open_storage", "read_volume",
]
