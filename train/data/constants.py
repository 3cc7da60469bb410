"""Constants with one home each: ImageNet mean/std and the data enumerations."""

# ImageNet RGB statistics on the 0-1 scale, as torchvision's pretrained models and every
# reference recipe use them. Images stay uint8 until the device, so the prefetcher scales them
# by 255 there.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision v2 policies by the recipe's "auto_augment" name (train.data.auto_augment).
AUTO_AUGMENT_POLICIES = ("ra", "ta_wide", "imagenet")
# ... or timm's config string after this prefix: "timm:rand-m6-mstd0.5-inc1" (timm_augment.py)
TIMM_AUGMENT_PREFIX = "timm:"
# Center-crop validation without a given resize: shorter side crop / 0.875 (256 -> 224), as
# torchvision's and timm's ResNet evaluation.
DEFAULT_VAL_CROP_RATIO = 0.875
DECODERS = ("cpu", "gpu")  # JPEG decode: CPU threads/processes, or nvJPEG (train.data.gpu_decode)

# How to get timm, for every feature that needs the optional extra (timm/ models, LAMB/LARS,
# timm: augmentations).
INSTALL_TIMM = "pip install 'shardtrain[timm]' or pip install timm"
