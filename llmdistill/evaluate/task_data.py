"""The local lm-eval tasks' data: three offline code tasks built from the embedded corpus's test split, and a
chat task built from the embedded instruction set's test split.

The task YAMLs (`tasks/`, shipped in the package; in the checkout a link to evals/tasks/) name their data
files relative to `task_data_dir()`, a cache directory outside the package, so that an installed (read-only)
package works too.
"""

from __future__ import annotations

import hashlib
import json
import keyword
import os
import random
import re
from pathlib import Path

from llmdistill.config import LLMDistillError

# The task YAMLs and their `!function utils.*` helpers; lm-eval's `--include_path` takes this directory.
TASKS_DIR = Path(__file__).resolve().parent / "tasks"
BUILD_COMMAND = "python -m llmdistill.cli build-tasks"
# Bump when the builder's output changes, so stale data is rebuilt instead of silently reused.
TASK_DATA_VERSION = 2
# Local task name -> the data file its YAML names (relative to task_data_dir()): the code tasks (tag
# llmdistill_code), and the chat task (no tag: it suits models that read the embedded chat template).
LOCAL_TASKS = {
    "llmdistill_code_bpb": "code_bpb.jsonl",
    "llmdistill_code_nextline": "code_nextline.jsonl",
    "llmdistill_code_identifier": "code_identifier.jsonl",
}
LOCAL_TAG = "llmdistill_code"
CHAT_TASKS = {"llmdistill_chat_answer": "chat_answer.jsonl"}
TASK_FILES = LOCAL_TASKS | CHAT_TASKS

# Sizes of the built tasks: a full run of all three takes about a minute per tiny model on CPU.
BPB_DOCS, BPB_CHUNK_CHARS = 150, 1200  # a 1200-char chunk is ~400 tokens: one window under 512 positions
NEXTLINE_DOCS, NEXTLINE_CONTEXT_LINES, NEXTLINE_CHOICES = 250, 12, 4
IDENT_DOCS, IDENT_CONTEXT_CHARS, IDENT_MIN_LEN = 200, 600, 4
CHAT_CHOICES = 4


def task_data_dir() -> Path:
    """Where the tasks' data files live; tasks/utils.py computes the same path without llmdistill."""
    from llmdistill import cache_dir

    return cache_dir() / "eval-data"


def _test_files() -> list[dict]:
    from llmdistill.data import embedded_corpus

    path = embedded_corpus()["test"]
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _chunks_at_lines(text: str, max_chars: int) -> list[str]:
    """Cut a file into chunks of whole lines, each at most `max_chars` (a longer single line is cut)."""
    chunks, current = [], ""
    for line in text.splitlines(keepends=True):
        while len(line) > max_chars:
            if current:
                chunks.append(current)
                current = ""
            chunks.append(line[:max_chars])
            line = line[max_chars:]
        if len(current) + len(line) > max_chars:
            chunks.append(current)
            current = ""
        current += line
    if current.strip():
        chunks.append(current)
    return [c for c in chunks if c.strip()]


def build_bpb_docs(files: list[dict], rng: random.Random) -> list[dict]:
    chunks = [
        {"text": c, "path": f["path"]} for f in files for c in _chunks_at_lines(f["text"], BPB_CHUNK_CHARS)
    ]
    rng.shuffle(chunks)  # a `limit` then samples across files instead of the first file's head
    return chunks[:BPB_DOCS]


def _is_candidate_line(line: str) -> bool:
    # Short lines ("pass", ")") are too alike to tell apart; comments are prose, not code.
    stripped = line.strip()
    return len(stripped) >= 8 and not stripped.startswith("#")


def build_nextline_docs(files: list[dict], rng: random.Random) -> list[dict]:
    positions = []
    for f in files:
        lines = f["text"].splitlines()
        candidates = [i for i, line in enumerate(lines) if _is_candidate_line(line)]
        for i in candidates:
            if i >= 4:
                positions.append((f, lines, candidates, i))
    rng.shuffle(positions)
    docs = []
    for f, lines, candidates, i in positions:
        true_line = lines[i]
        pool = sorted({lines[j] for j in candidates if lines[j].strip() != true_line.strip()})
        if len(pool) < NEXTLINE_CHOICES - 1:
            continue
        choices = [true_line, *rng.sample(pool, NEXTLINE_CHOICES - 1)]
        order = list(range(NEXTLINE_CHOICES))
        rng.shuffle(order)
        context = "\n".join(lines[max(0, i - NEXTLINE_CONTEXT_LINES) : i]) + "\n"
        docs.append(
            {
                "context": context,
                "choices": [choices[k] for k in order],
                "label": order.index(0),
                "path": f["path"],
                "line": i + 1,
            }
        )
        if len(docs) == NEXTLINE_DOCS:
            break
    return docs


def build_identifier_docs(files: list[dict], rng: random.Random) -> list[dict]:
    positions = []
    for f in files:
        text = f["text"]
        for m in re.finditer(r"(?<![A-Za-z0-9_])[A-Za-z_][A-Za-z0-9_]*", text):
            name = m.group(0)
            if len(name) < IDENT_MIN_LEN or keyword.iskeyword(name) or m.start() < IDENT_CONTEXT_CHARS:
                continue
            positions.append((f, m.start(), name))
    rng.shuffle(positions)
    docs = []
    for f, start, name in positions:
        text = f["text"]
        # A space before the identifier belongs to the identifier's token in a byte-level BPE (" name"):
        # leave it to the model, or a context ending in a space would force an unnatural tokenization.
        cut = start - 1 if text[start - 1] == " " else start
        window = text[cut - IDENT_CONTEXT_CHARS : cut]
        window = window[window.find("\n") + 1 :]  # start at a line boundary
        # Only identifiers the context already shows: the answer is inferable, not a guess at a new name.
        if not re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", window):
            continue
        docs.append({"context": window, "target": name, "path": f["path"], "offset": start})
        if len(docs) == IDENT_DOCS:
            break
    return docs


def build_chat_docs(rng: random.Random) -> list[dict]:
    """Held-out instructions (the chat set's test split) as multiple choice: the chat prompt in the embedded
    chat template, the reference answer among 3 answers to other instructions of the same kind. A code
    answer's distractors are renamed to the asked function's name, so the name alone gives nothing away."""
    from llmdistill.data import embedded_chat_set
    from llmdistill.embedded import EMBEDDED_CHAT_TEMPLATE, EMBEDDED_TEACHER
    from llmdistill.models import load_tokenizer

    tokenizer = load_tokenizer(str(EMBEDDED_TEACHER))
    template = EMBEDDED_CHAT_TEMPLATE.read_text()
    rows = [json.loads(line) for line in embedded_chat_set()["test"].read_text().splitlines() if line.strip()]
    docs = []
    for row in rows:
        user, assistant = row["messages"]
        pool = sorted(
            {r["messages"][1]["content"] for r in rows if r["kind"] == row["kind"]} - {assistant["content"]}
        )
        distractors = rng.sample(pool, CHAT_CHOICES - 1)
        if row["kind"] == "write":
            name = re.match(r"(?:async )?def (\w+)", assistant["content"]).group(1)
            distractors = [re.sub(r"^((?:async )?def )\w+", rf"\g<1>{name}", d, count=1) for d in distractors]
        choices = [assistant["content"], *distractors]
        if len(set(choices)) < CHAT_CHOICES:
            continue
        order = list(range(CHAT_CHOICES))
        rng.shuffle(order)
        prompt = tokenizer.apply_chat_template(
            [user], chat_template=template, tokenize=False, add_generation_prompt=True
        )
        docs.append(
            {
                "context": prompt,
                "choices": [choices[k] for k in order],
                "label": order.index(0),
                "kind": row["kind"],
                "path": row["path"],
            }
        )
    rng.shuffle(docs)  # a `limit` then samples both kinds and many files
    return docs


def build_task_data(data_dir: str | Path | None = None, force: bool = False) -> dict[str, Path]:
    """Write the local tasks' jsonl files from the embedded corpus's test split (deterministic).

    Skipped when the directory (default `task_data_dir()`) already holds data from the same corpus and builder
    version (see manifest.json).
    """
    from llmdistill.data import embedded_corpus

    out = Path(data_dir) if data_dir is not None else task_data_dir()
    corpus_manifest = json.loads(embedded_corpus()["manifest"].read_text())
    stamp = {"version": TASK_DATA_VERSION, "corpus_sha256": corpus_manifest["content_sha256"]}
    paths = {task: out / name for task, name in TASK_FILES.items()}
    manifest_path = out / "manifest.json"
    if not force and manifest_path.exists() and all(p.exists() for p in paths.values()):
        if {k: v for k, v in json.loads(manifest_path.read_text()).items() if k in stamp} == stamp:
            return paths
    files = _test_files()
    builders = {
        "llmdistill_code_bpb": lambda rng: build_bpb_docs(files, rng),
        "llmdistill_code_nextline": lambda rng: build_nextline_docs(files, rng),
        "llmdistill_code_identifier": lambda rng: build_identifier_docs(files, rng),
        "llmdistill_chat_answer": build_chat_docs,
    }
    out.mkdir(parents=True, exist_ok=True)
    counts, digests = {}, {}
    for seed, (task, build) in enumerate(builders.items()):
        docs = build(random.Random(seed))  # one fixed seed per task: the same data on every machine
        body = "".join(json.dumps(d, sort_keys=True) + "\n" for d in docs)
        _write_atomic(paths[task], body)
        counts[task], digests[task] = len(docs), hashlib.sha256(body.encode()).hexdigest()
    _write_atomic(manifest_path, json.dumps({**stamp, "documents": counts, "sha256": digests}, indent=2))
    return paths


def _write_atomic(path: Path, text: str) -> None:
    # The data directory is shared by every run on the machine: a temporary name per process, then a rename.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def check_task_data(tasks: list[str], data_dir: str | Path | None = None) -> None:
    """Raise the error a user can act on when a local task's data file is missing."""
    root = Path(data_dir) if data_dir is not None else task_data_dir()
    for task in expand_local(tasks):
        path = root / TASK_FILES[task]
        if not path.is_file():
            raise LLMDistillError(f"task data not built for {task}: {path} is missing; run `{BUILD_COMMAND}`")


def expand_local(tasks: list[str]) -> list[str]:
    """The local task names among `tasks`, their tag expanded."""
    out = []
    for t in tasks:
        out.extend(LOCAL_TASKS if t == LOCAL_TAG else [t] if t in TASK_FILES else [])
    return out
