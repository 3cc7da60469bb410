"""`python -m train ...` (what torchrun runs: `torchrun --nproc_per_node=8 -m train run ...`)."""

from train.cli import app

if __name__ == "__main__":
    app(prog_name="train")
