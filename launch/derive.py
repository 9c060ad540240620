"""Derive a student from the teacher by pruning: `python launch/derive.py --config configs/tiny/derive.yaml`.

With `deepspeed --num_gpus 2 launch/derive.py ...` the calibration data is split across ranks. The same as
`llmdistill derive ...`; see llmdistill/derive/.
"""

import sys

from llmdistill.cli import main

if __name__ == "__main__":
    sys.exit(main(["derive", *sys.argv[1:]]))
