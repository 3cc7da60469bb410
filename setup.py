"""The one compiled part: train.data.decode_native (train/data/native/decode_native.c, the
loader's hot path).

Everything else is declared in pyproject.toml. `optional=True`: without a C compiler or
libjpeg's headers (Debian/Ubuntu: libjpeg62-turbo-dev or libjpeg-turbo8-dev) the install goes
on without it and train falls back to its pure-Python decode path (train/data/decode.py says which
one runs).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "train.data.decode_native",
            ["train/data/native/decode_native.c"],
            libraries=["jpeg"],
            depends=["train/data/native/decode_resample.h"],
            extra_compile_args=["-O3"],
            optional=True,
        )
    ]
)
