"""Benchmark teacher vs students: `python launch/eval.py --config configs/tiny/eval.yaml [key=value ...]`.

The same as `llmdistill eval ...`; see llmdistill/evaluate/.
"""

import sys

from llmdistill.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
