"""Training: DeepSpeed engine set-up, optimizer groups, LoRA/freezing, schedules, the loop, checkpoints, metrics."""
