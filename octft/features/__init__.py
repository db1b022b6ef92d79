"""Frozen-feature store: a frozen encoder's outputs computed once per sweep and shared by every trial.

`store` (no torch) keys, writes, checks and memory-maps entries; `frozen` computes features with a runtime
and serves them as the datasets `fit()` trains heads on during frozen epochs.
"""

from octft.features.store import FeatureEntry, FeatureKey, FeaturePlan, FeatureStore, checkpoint_identity

__all__ = ["FeatureEntry", "FeatureKey", "FeaturePlan", "FeatureStore", "checkpoint_identity"]
