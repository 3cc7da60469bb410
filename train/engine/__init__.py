"""The step: model (+ layers), one optimizer step (step.py) and the public step loop
(`train_steps` + `on_sync`, loop.py), with the DDP helpers (dist.py) they need.
Imports train.plan and train.data, never train.run.
"""
