"""What a run is asked to do, without torch: settings (config), the phases file (ours or
imagenet18's) -> Schedule (per-epoch maths), the loader-rebuild rule and the dry-run table.
Imports nothing of train.data, train.engine or train.run.
"""
