"""The training loop: phases, DDP, torch.compile, EMA, checkpoints, snapshots, logging."""
