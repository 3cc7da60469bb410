"""prep: raw ImageNet archives or class folders -> resolution-specific LMDB / msgpack shards."""
