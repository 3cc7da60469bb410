"""`train bench` and `train bench-loader`: phases (synthetic vs real data), the loader alone, and
optimizer step times; each prints ratios against a baseline measured in the same run."""
