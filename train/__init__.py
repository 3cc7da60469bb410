"""train: a lean DDP + AMP trainer over prep's shards. Reading order: train/README.md
(config -> phases -> data -> model -> loop -> checkpoint -> run -> cli)."""
