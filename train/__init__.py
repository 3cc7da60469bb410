"""train: loaders, schedule and a lean DDP + AMP trainer over prep's shards."""
