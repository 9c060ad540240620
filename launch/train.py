"""Train a student: `deepspeed --num_gpus 2 launch/train.py --config configs/tiny/distill.yaml [key=value
...]`.

Also runs under `torchrun --nproc_per_node N`, `srun`, or as one plain process.
"""

import sys

from llmdistill.cli import main

if __name__ == "__main__":
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment already says the same.
    sys.exit(main(["train", *[a for a in sys.argv[1:] if not a.startswith("--local_rank")]]))
