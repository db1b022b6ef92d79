"""What an AI-READI release looks like: folders, devices, classes, splits.

The constants here are the single source for every part of the data layer (locator, labels,
synthetic data), so that the layout is described once.
"""

from __future__ import annotations

OCT_PREFIX = "retinal_oct/structural_oct"
MANIFEST_KEY = "retinal_oct/manifest.tsv"
LABELS_KEY = "participants.tsv"

DEVICES = ("heidelberg_spectralis", "topcon_maestro2", "topcon_triton", "zeiss_cirrus")

# The class index is the position in this tuple; it never changes between runs.
CLASSES = (
    "healthy",
    "pre_diabetes_lifestyle_controlled",
    "oral_medication_and_or_non_insulin_injectable_medication_controlled",
    "insulin_dependent",
)
# Spellings seen in AI-READI releases, mapped to the canonical name above.
CLASS_ALIASES = {
    "oral_medication_and/or_non_insulin_injectable_medication_controlled": CLASSES[2],
}
CLASS_SHORT_NAMES = ("healthy", "prediabetes", "oral_med", "insulin")

SPLITS = ("train", "val", "test")

# AI-READI participant IDs are four digits; the first names the site.
SITE_DIGITS = ("1", "4", "7")

LATERALITIES = ("L", "R")
