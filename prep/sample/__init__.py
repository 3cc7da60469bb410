"""Demo and test data made on the spot, no download: `archives` writes ILSVRC2012's three
archives (`prep sample`), `images` draws their procedural images, `mirrors` writes images in
each download mirror's file layout."""

from prep.sample.archives import SampleInfo, write_sample

__all__ = ["SampleInfo", "write_sample"]
