"""Score the training set once with vLLM's offline engine and write the teacher cache (teacher.cache.dir).

    python launch/cache_teacher.py --config configs/tiny/vllm_cache.yaml [--overwrite] [key=value ...]

The same as `llmdistill cache-teacher ...`: shards already on disk are kept, so an interrupted build
resumes; a directory built for another teacher, tokenizer, K or dataset is refused unless --overwrite. Train
from it with teacher.source=vllm_cache.
"""

import sys

from llmdistill.cli import main

if __name__ == "__main__":
    sys.exit(main(["cache-teacher", *sys.argv[1:]]))
