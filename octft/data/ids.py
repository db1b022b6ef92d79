"""One normalisation for participant IDs, used on the labels side and the files side."""

from __future__ import annotations

import functools
import re

# Prefixes seen in the wild in front of AI-READI IDs (folder names, exported tables).
_PREFIX = re.compile(r"^(?:sub[-_]?|aireadi[-_]?|ai-readi[-_]?|participant[-_]?|p[-_])", re.IGNORECASE)


def canonical_participant_id(value: object) -> str | None:
    """The canonical form of a participant ID, or None when `value` is not one.

    Labels read by pandas arrive as integers (or floats when the column has gaps), folder
    names as strings, sometimes zero-padded or prefixed. All end as the same digits:

    >>> [canonical_participant_id(v) for v in (1001, 1001.0, "1001", "01001", "sub-1001", "AIREADI-1001")]
    ['1001', '1001', '1001', '1001', '1001', '1001']
    >>> canonical_participant_id("notes") is None
    True
    """
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float):
        if value != value or not value.is_integer():  # NaN or a fraction
            return None
        value = int(value)
    return _canonical_text(str(value))


@functools.lru_cache(maxsize=1 << 16)
def _canonical_text(text: str) -> str | None:
    # Cached: a release repeats each participant's folder name once per file.
    text = text.strip()
    text = _PREFIX.sub("", text)
    if text.endswith(".0") and text[:-2].isdigit():
        text = text[:-2]
    if not text.isdigit():
        return None
    text = text.lstrip("0")
    return text or None
