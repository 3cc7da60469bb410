import random

import numpy as np

from train.data.crops import CROP_DRAWS, TrainCrop


def one_box(crop: TrainCrop, height: int, width: int, rng: random.Random) -> tuple[int, ...]:
    """One image's random-resized box, its uniforms drawn from `rng` (the loader draws them
    per sample from counters: train.data.samplers)."""
    uniforms = np.array([[rng.random() for _ in range(CROP_DRAWS)]])
    return tuple(int(v) for v in crop.boxes([height], [width], uniforms)[0])
