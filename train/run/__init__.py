"""One training run: main.run() checks everything, then epochs.py drives the loop; around it the
data source and shard checks, checkpoints, the run directory, signals, metrics and targets.
"""
