"""Derive a student from the teacher by pruning.

python launch/derive.py --config configs/tiny/derive.yaml [key=value ...]
deepspeed --num_gpus 2 launch/derive.py --config configs/tiny/derive.yaml   # calibration split over ranks
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing


def main(argv: list[str] | None = None) -> int:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--config", help="YAML config (see configs/tiny/derive.yaml)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by `deepspeed`
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. derive.target.num_layers=4")
    args = parser.parse_args(argv)

    # transformers' per-call progress bars ("Loading weights") would bury the one line that matters
    from transformers.utils import logging as hf_logging

    from llmdistill.config import LLMDistillError, load_config

    hf_logging.disable_progress_bar()

    try:
        cfg = load_config(args.config, args.overrides)
        from llmdistill.derive import derive_student

        out = derive_student(cfg)
    except LLMDistillError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import torch

    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(f"derived student written to {out} (scores in {out / 'derivation.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
