"""Train a student: `deepspeed --num_gpus 2 launch/train.py --config configs/tiny/distill.yaml [k=v ...]`.

Also runs under `torchrun --nproc_per_node N`, `srun`, or as one plain process. The same as
`llmdistill train ...`.
"""

import sys

from llmdistill.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
