"""Training: the trainer loop, optimizer and schedules, checkpoints, metrics, parallelism, recipes."""
