"""octft: sweeps of V-JEPA 2 OCT encoder fine-tunes on TPUs."""

__version__ = "0.1.0"
