"""Score the training set once with vLLM's offline engine and write the teacher cache (teacher.cache.dir).

    python launch/cache_teacher.py --config configs/tiny/vllm_cache.yaml [--overwrite] [key=value ...]

Shards already on disk are kept, so an interrupted build resumes; a directory built for another teacher,
tokenizer, K or dataset is refused unless --overwrite. Train from it with teacher.source=vllm_cache.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--overwrite", action="store_true", help="replace a cache built for another run")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args()
    import logging

    from llmdistill.config import LLMDistillError, load_config
    from llmdistill.teachers.vllm_cache_build import build_cache

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        root = build_cache(load_config(args.config, args.overrides), overwrite=args.overwrite)
    except LLMDistillError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"teacher cache complete: {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
