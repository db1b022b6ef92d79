"""Fine-tuning: the training loop, its step, metrics and losses."""
