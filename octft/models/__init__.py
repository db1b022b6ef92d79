"""Models: the V-JEPA 2 video encoder, its checkpoint loader, and classification heads."""

from octft.models.checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    LoadReport,
    inspect_checkpoint,
    load_encoder_checkpoint,
    read_encoder_state,
)
from octft.models.encoder import VIT_SIZES, VideoViT, build_encoder, encoder_flops_per_sample
from octft.models.heads import AttentiveProbe, Classifier, LinearHead, MLPHead, build_head

__all__ = [
    "VIT_SIZES",
    "AttentiveProbe",
    "CheckpointError",
    "CheckpointMismatchError",
    "Classifier",
    "LinearHead",
    "LoadReport",
    "MLPHead",
    "VideoViT",
    "build_encoder",
    "build_head",
    "encoder_flops_per_sample",
    "inspect_checkpoint",
    "load_encoder_checkpoint",
    "read_encoder_state",
]
