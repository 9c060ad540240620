"""Chunk alignment between two tokenizations of the same text, for cross-tokenizer distillation (ALM, ULD).

Every token is mapped to the bytes it stands for (byte-level BPE through the GPT-2 byte alphabet,
SentencePiece through `▁` and `<0xNN>` byte-fallback pieces, anything else as UTF-8), so each token gets a
byte span [start, end) in the text. A byte offset where both tokenizations have a token boundary is a
*common boundary*; consecutive common boundaries delimit a *chunk*: one or more tokens of each side covering
exactly the same bytes. Every byte of the aligned region belongs to exactly one chunk.

Chunk kinds: "unconstrained" cuts at every common boundary; "space" only at common boundaries that sit before
a whitespace byte or at a document boundary (whole words, the kind ALM calls space-constrained).

Special tokens stand for no text bytes. Packed streams give every document one extra virtual "separator" byte
owned by its last token (the end-of-sequence token when there is one), so an EOS of both sides forms its own
chunk and no chunk ever spans two documents.

The data pipeline (`pack_aligned`) runs all of this in `datasets.map` workers: numpy per window, no model.
"""

from __future__ import annotations

import json
import logging
import re
from functools import lru_cache

import numpy as np

from llmdistill import data
from llmdistill.config import DataConfig, LLMDistillError
from llmdistill.signal import IGNORE_INDEX

log = logging.getLogger(__name__)

CHUNK_KINDS = ("unconstrained", "space")
_WHITESPACE = np.frombuffer(b" \t\n\r\x0b\x0c", dtype=np.uint8)
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


# ---------------------------------------------------------------------------------------------- token bytes


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    # GPT-2's reversible byte -> printable character table, inverted: printable bytes map to themselves, the
    # rest to chr(256 + n) in byte order.
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


def tokenizer_scheme(tokenizer) -> str:
    """How token strings spell bytes: "byte_level" (GPT-2 alphabet), "metaspace" (SentencePiece `▁` and
    `<0xNN>`), or "utf8"."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return "metaspace" if "▁" in "".join(list(tokenizer.get_vocab())[:5000]) else "utf8"
    spec = json.loads(backend.to_str())
    parts = json.dumps({k: spec.get(k) for k in ("pre_tokenizer", "decoder")}, ensure_ascii=False)
    if '"ByteLevel"' in parts:
        return "byte_level"
    if "Metaspace" in parts or "▁" in parts or "ByteFallback" in parts:
        return "metaspace"
    return "utf8"


def token_bytes_table(tokenizer) -> tuple[list[bytes], np.ndarray]:
    """(bytes of every token id, is-special mask). Special tokens stand for no bytes."""
    scheme = tokenizer_scheme(tokenizer)
    size = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
    special = np.zeros(size, dtype=bool)
    for i in tokenizer.all_special_ids:
        if 0 <= i < size:
            special[i] = True
    added = {}
    for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if i < size:
            if tok.special:
                special[i] = True
            else:
                added[i] = tok.content.encode()  # added tokens match raw text, not the byte alphabet
    decoder = _byte_level_decoder()
    table = []
    for i, piece in enumerate(pieces):
        if special[i] or piece is None:
            table.append(b"")
        elif i in added:
            table.append(added[i])
        elif scheme == "byte_level":
            try:
                table.append(bytes(decoder[c] for c in piece))
            except KeyError:  # a token outside the byte alphabet: read it as text
                table.append(piece.encode())
        elif scheme == "metaspace":
            m = _BYTE_PIECE.match(piece)
            table.append(bytes([int(m.group(1), 16)]) if m else piece.replace("▁", " ").encode())
        else:
            table.append(piece.encode())
    return table, special


def space_token_mask(tokenizer) -> np.ndarray:
    """Per token id: the token starts with a whitespace byte or stands for no text (EOS and the other special
    tokens), i.e. a token that can follow a chunk which ends a word. ALM's debiasing (tokenkit's space mask,
    read from token bytes so that it holds for byte-level, SentencePiece and byte tokenizers alike)."""
    table, special = token_bytes_table(tokenizer)
    starts = np.fromiter((b[0] if b else -1 for b in table), dtype=np.int64, count=len(table))
    return special | np.isin(starts, _WHITESPACE)


def document_byte_lengths(ids: list[int], table: list[bytes], text_bytes: bytes, who: str) -> np.ndarray:
    """Bytes each token of one document stands for, checked against the document's own bytes.

    A SentencePiece dummy prefix (a leading space the text does not have) is taken off the first token. A
    tokenizer that rewrites text (lower-casing, Unicode normalisation) cannot be aligned by bytes: an error.
    """
    lengths = np.fromiter((len(table[i]) for i in ids), dtype=np.int64, count=len(ids))
    spelled = b"".join(table[i] for i in ids)
    if spelled != text_bytes:
        first = int(np.flatnonzero(lengths)[0]) if lengths.any() else -1
        if spelled == b" " + text_bytes and first >= 0:
            lengths[first] -= 1
        else:
            at = next((k for k, (x, y) in enumerate(zip(spelled, text_bytes, strict=False)) if x != y), None)
            at = min(len(spelled), len(text_bytes)) if at is None else at
            raise LLMDistillError(
                f"the {who} tokenizer does not spell the text back byte for byte "
                f"(first difference at byte {at}: "
                f"{text_bytes[max(0, at - 10) : at + 10]!r} vs {spelled[max(0, at - 10) : at + 10]!r}); "
                "cross-tokenizer alignment needs tokenizers without text normalisation"
            )
    return lengths


# ---------------------------------------------------------------------------------------------- chunks


def common_boundaries(
    a_start: np.ndarray, a_end: np.ndarray, b_start: np.ndarray, b_end: np.ndarray
) -> np.ndarray:
    """Sorted byte offsets where both tokenizations have a token boundary (the aligned region's edges
    included)."""
    a = np.union1d(a_start, a_end)
    b = np.union1d(b_start, b_end)
    return np.intersect1d(a, b, assume_unique=True)


def _chunk_of(start: np.ndarray, end: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    """Index of the chunk [cuts[c], cuts[c+1]) holding each token, -1 outside the aligned region."""
    if len(cuts) < 2:
        return np.full(len(start), -1, dtype=np.int64)
    c = np.searchsorted(cuts, start, side="right") - 1
    inside = (c >= 0) & (c < len(cuts) - 1)
    c = np.where(inside, c, 0)
    inside &= end <= cuts[c + 1]
    return np.where(inside, c, -1)


def align_chunks(
    a_start: np.ndarray,
    a_end: np.ndarray,
    b_start: np.ndarray,
    b_end: np.ndarray,
    a_ok: np.ndarray | None = None,
    b_ok: np.ndarray | None = None,
    allowed: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Chunk id per token of side a and side b (-1: in no usable chunk), and the number of chunks.

    `a_start/a_end` (and b's) are the tokens' byte spans, contiguous and in order. `a_ok`/`b_ok` mark tokens
    whose likelihood is known (e.g. not the first token of a window or a document): a chunk holding any token
    that is not ok is dropped, and the rest are numbered 0..n-1 in text order. `allowed`, indexed by byte
    offset, restricts cuts to those offsets (the "space" kind); the region's two edges are always cuts.
    """
    cuts = common_boundaries(a_start, a_end, b_start, b_end)
    if allowed is not None and len(cuts) > 2:
        keep = allowed[cuts]
        keep[0] = keep[-1] = True
        cuts = cuts[keep]
    ca = _chunk_of(a_start, a_end, cuts)
    cb = _chunk_of(b_start, b_end, cuts)
    n = max(len(cuts) - 1, 0)
    bad = np.zeros(n + 1, dtype=bool)  # slot n collects tokens outside every chunk, then is ignored
    if a_ok is not None:
        np.logical_or.at(bad, np.where(ca >= 0, ca, n), ~a_ok)
    if b_ok is not None:
        np.logical_or.at(bad, np.where(cb >= 0, cb, n), ~b_ok)
    bad = bad[:n]
    # Chunks hold at least one token of each side unless both sides' tokens there are all zero-length.
    has_a = np.zeros(n, dtype=bool)
    has_b = np.zeros(n, dtype=bool)
    has_a[ca[ca >= 0]] = True
    has_b[cb[cb >= 0]] = True
    bad |= ~(has_a & has_b)
    renumber = np.cumsum(~bad) - 1
    renumber[bad] = -1
    renumber = np.append(renumber, -1)
    return renumber[ca], renumber[cb], int((~bad).sum())


def spans_from_lengths(lengths: np.ndarray, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    end = np.cumsum(lengths) + offset
    return end - lengths, end


def text_spans(text: str, tokenizer, table=None) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Token ids of `text` (no special tokens) and their byte spans."""
    table = table or token_bytes_table(tokenizer)[0]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    lengths = document_byte_lengths(ids, table, text.encode(), "given")
    return ids, *spans_from_lengths(lengths)


def whitespace_cuts(text_bytes: bytes) -> np.ndarray:
    """allowed[p]: a "space" chunk may start at byte p (the byte there is whitespace, or p is the end)."""
    arr = np.frombuffer(text_bytes, dtype=np.uint8)
    return np.append(np.isin(arr, _WHITESPACE), True)


def align_text(text: str, tokenizer_a, tokenizer_b, kind: str = "unconstrained") -> list[tuple[list, list]]:
    """The chunks of one text as (token ids of a, token ids of b) pairs, in order: for tests, inspection."""
    ids_a, sa, ea = text_spans(text, tokenizer_a)
    ids_b, sb, eb = text_spans(text, tokenizer_b)
    allowed = whitespace_cuts(text.encode()) if kind == "space" else None
    ca, cb, n = align_chunks(sa, ea, sb, eb, allowed=allowed)
    chunks = [([], []) for _ in range(n)]
    for i, c in zip(ids_a, ca, strict=True):
        if c >= 0:
            chunks[c][0].append(i)
    for i, c in zip(ids_b, cb, strict=True):
        if c >= 0:
            chunks[c][1].append(i)
    return chunks


# ---------------------------------------------------------------------------------------------- packing


# A document a tokenizer cannot spell back byte for byte (a literal "▁" under a SentencePiece tokenizer, which
# decodes it as a space; a character a tokenizer without byte fallback reads as <unk>) is left out of
# cross-tokenizer data with a warning; when more than this share of a batch of documents fails, the tokenizer
# itself is the problem (it normalises text): refused. Special-token strings in text are no such case: data is
# encoded with split_special_tokens, and the embedded tokenizers spell them out.
MAX_UNSPELLABLE = 0.01


def _tokenize_documents(texts: list[str], tokenizer, table, who: str):
    """Concatenated ids, byte spans and document index of every token, and the documents that could not be
    spelled back (left out)."""
    eos = tokenizer.eos_token_id
    encoded = tokenizer(texts, add_special_tokens=True, split_special_tokens=True)["input_ids"]  # as data.py
    ids, lengths, doc, unspellable = [], [], [], {}
    for d, (text, row) in enumerate(zip(texts, encoded, strict=True)):
        if eos is not None and (not row or row[-1] != eos):
            row = [*row, eos]
        try:
            n = document_byte_lengths(row, table, text.encode(), who)
        except LLMDistillError as err:
            unspellable[d] = str(err)
            continue
        n[-1] += 1  # the document's virtual separator byte belongs to its last token (its EOS when present)
        ids.extend(row)
        lengths.append(n)
        doc.extend([d] * len(row))
    start, end = spans_from_lengths(np.concatenate(lengths) if lengths else np.zeros(0, np.int64))
    return np.asarray(ids, dtype=np.int64), start, end, np.asarray(doc, dtype=np.int64), unspellable


def _spellable_documents(texts: list[str], student, teacher) -> list[str]:
    """`texts` less the documents either tokenizer cannot spell back; refuses a tokenizer that fails often."""
    bad = {**student, **teacher}
    if len(bad) > MAX_UNSPELLABLE * len(texts):
        raise LLMDistillError(next(iter(bad.values())))
    if bad:
        log.warning(
            f"cross-tokenizer data: left out {len(bad)} of {len(texts)} documents that a tokenizer "
            f"cannot spell back byte for byte (first: {next(iter(bad.values()))})"
        )
    return [t for d, t in enumerate(texts) if d not in bad]


def _positions(doc: np.ndarray) -> np.ndarray:
    """Position ids restarting at 0 at the window start and at every document start."""
    new = np.ones(len(doc), dtype=bool)
    new[1:] = doc[1:] != doc[:-1]
    idx = np.arange(len(doc))
    last_start = np.maximum.accumulate(np.where(new, idx, 0))
    return idx - last_start


def pack_aligned(texts: list[str], student_tok, teacher_tok, seq_len: int, tables=None) -> dict[str, list]:
    """Pack documents into the student's fixed-length windows, each with the teacher's tokens of the same
    text and the chunk alignment between them.

    Student keys mean what they mean in `data.pack_documents` (seq_len tokens, shifted `targets`, -100 across
    documents, `position_ids` restarting per document). Added: `teacher_input_ids`/`teacher_position_ids`
    (the teacher tokens overlapping the window's bytes; variable length, see `pad_teacher`), and for each kind
    in CHUNK_KINDS, `student_chunks` / `teacher_chunks` (or `*_space_chunks`): per position t, the chunk id of
    the token predicted at t (the token at t + 1), -1 where that token is in no complete, fully predicted
    chunk.
    """
    s_table, _ = tables[0] if tables else token_bytes_table(student_tok)
    t_table, _ = tables[1] if tables else token_bytes_table(teacher_tok)
    s_ids, s_start, s_end, s_doc, s_bad = _tokenize_documents(texts, student_tok, s_table, "student")
    t_ids, t_start, t_end, t_doc, t_bad = _tokenize_documents(texts, teacher_tok, t_table, "teacher")
    if s_bad or t_bad:  # rare: tokenize again without them, so both sides index the same documents
        texts = _spellable_documents(texts, s_bad, t_bad)
        s_ids, s_start, s_end, s_doc, _ = _tokenize_documents(texts, student_tok, s_table, "student")
        t_ids, t_start, t_end, t_doc, _ = _tokenize_documents(texts, teacher_tok, t_table, "teacher")
    # Where "space" chunks may be cut: before whitespace, and at document starts and separators.
    stream = b"".join(t.encode() + b"\n" for t in texts)  # "\n" stands in for each separator byte
    allowed = whitespace_cuts(stream)
    doc_ends = np.cumsum([len(t.encode()) + 1 for t in texts], dtype=np.int64)
    allowed[doc_ends] = True  # a document's first byte, whitespace or not
    keys = ["input_ids", "position_ids", "targets", "teacher_input_ids", "teacher_position_ids"]
    keys += [f"{side}_{kind}" for kind in ("chunks", "space_chunks") for side in ("student", "teacher")]
    out: dict[str, list] = {k: [] for k in keys}
    for first in range(0, len(s_ids) - seq_len, seq_len):
        s = slice(first, first + seq_len + 1)  # seq_len inputs and the last target
        sd = s_doc[s]
        s_ok = np.ones(seq_len + 1, dtype=bool)
        s_ok[0] = False
        s_ok[1:] = sd[1:] == sd[:-1]  # a token has a known likelihood iff its predecessor is in its document
        lo, hi = s_start[first], s_end[first + seq_len]
        j0 = int(np.searchsorted(t_end, lo, side="right"))
        j1 = int(np.searchsorted(t_start, hi, side="left"))
        t = slice(j0, max(j1, j0 + 1))
        td = t_doc[t]
        t_ok = np.ones(len(td), dtype=bool)
        t_ok[0] = False
        t_ok[1:] = td[1:] == td[:-1]
        window_ids = s_ids[s]
        out["input_ids"].append(window_ids[:-1].tolist())
        out["targets"].append(np.where(s_ok[1:], window_ids[1:], IGNORE_INDEX).tolist())
        out["position_ids"].append(_positions(sd[:-1]).tolist())
        out["teacher_input_ids"].append(t_ids[t].tolist())
        out["teacher_position_ids"].append(_positions(td).tolist())
        for kind, cut in (("chunks", None), ("space_chunks", allowed)):
            cs, ct, _ = align_chunks(s_start[s], s_end[s], t_start[t], t_end[t], s_ok, t_ok, cut)
            # Position t predicts token t + 1: shift, and the teacher's last position predicts nothing here.
            out[f"student_{kind}"].append(cs[1:].tolist())
            out[f"teacher_{kind}"].append([*ct[1:].tolist(), -1])
    return out


TEACHER_KEYS = ("teacher_input_ids", "teacher_position_ids", "teacher_chunks", "teacher_space_chunks")


def pad_teacher(sample: dict, length: int, pad_id: int) -> dict:
    """Pad (or cut) a sample's teacher columns to `length`; a cut drops the chunks it breaks."""
    n = len(sample["teacher_input_ids"])
    out = {}
    for key, fill in zip(TEACHER_KEYS, (pad_id, 0, -1, -1), strict=True):
        values = sample[key][:length]
        out[key] = values + [fill] * (length - len(values))
    if n > length:
        # The last kept position predicts a token that was cut; a chunk with a cut token is incomplete.
        for key, skey in (
            ("teacher_chunks", "student_chunks"),
            ("teacher_space_chunks", "student_space_chunks"),
        ):
            kept = out[key][: length - 1]
            broken = set(sample[key][length - 1 :]) - {-1}
            out[key] = [c if c not in broken else -1 for c in kept] + [-1]
            out[skey] = [c if c not in broken else -1 for c in sample[skey]]
    return out


def aligned_dataset(
    texts, student_tok, teacher_tok, seq_len: int, name: str, max_teacher_len: int | None = None
):
    """`pack_aligned` over a `datasets.Dataset` of texts (cached by `datasets`), the teacher columns padded to
    the longest window's teacher length (at most `max_teacher_len`), in torch format."""
    tables = (token_bytes_table(student_tok), token_bytes_table(teacher_tok))
    packed = data.cached_map(
        texts,
        lambda b: pack_aligned(b["text"], student_tok, teacher_tok, seq_len, tables),
        batched=True,
        batch_size=2000,
        remove_columns=texts.column_names,
    )
    return _pad_packed(packed, teacher_tok, name, seq_len, max_teacher_len)


def _pad_packed(packed, teacher_tok, name: str, seq_len: int, max_teacher_len: int | None):
    if len(packed) == 0:
        raise LLMDistillError(f"dataset {name} has fewer than {seq_len + 1} tokens: nothing to train on")
    longest = max(len(ids) for ids in packed["teacher_input_ids"])
    length = min(longest, max_teacher_len) if max_teacher_len else longest
    pad = teacher_tok.pad_token_id if teacher_tok.pad_token_id is not None else teacher_tok.eos_token_id or 0
    packed = data.cached_map(packed, pad_teacher, fn_kwargs={"length": length, "pad_id": pad})
    packed.set_format("torch")
    return packed


# ---------------------------------------------------------------------------------------------- chats
#
# Chat data (format: messages, or prompt_completion with data.chat): the student renders each conversation
# with its chat template, the teacher with its own, and each side tokenizes its own rendering. The two texts
# differ in everything but the turns' content, so chunks are formed only inside the assistant answers: per
# answer, the tokens of each side lying wholly inside the answer's text get byte spans relative to the
# answer's first byte, and the common boundaries of the two sides cut the answer into chunks. Template tokens
# (role headers, end-of-turn markers, BOS) and the system/user turns are outside every chunk; a token that
# straddles an answer's edge (a template gluing its header to the answer's first characters) is too, and the
# answer's aligned region then starts (or ends) at the first (last) common boundary inside it. With templates
# that keep the answer's edges token boundaries on both sides, as ChatML-like ones do, the chunks tile every
# trained answer. The student's targets are those of chat data without a teacher: the answers and their
# end-of-turn markers (data.train_on, data.truncation apply to the student's rendering).


def _answer_tokens(text: str, offsets, ids, table, start: int, end: int, who: str):
    """Indices of the tokens lying wholly inside characters [start, end) of `text`, and their byte spans
    relative to the byte at `start`."""
    inside = [i for i, (a, b) in enumerate(offsets) if a >= start and b <= end and b > a]
    if not inside:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    first, last = inside[0], inside[-1]
    if inside != list(range(first, last + 1)):
        raise LLMDistillError(f"the {who} tokenizer's offsets are not in text order inside an answer")
    lengths = document_byte_lengths(
        [ids[i] for i in inside], table, text[offsets[first][0] : offsets[last][1]].encode(), who
    )
    begin = len(text[start : offsets[first][0]].encode())
    token_start, token_end = spans_from_lengths(lengths, begin)
    return np.asarray(inside, dtype=np.int64), token_start, token_end


def chat_chunks(student: dict, teacher: dict, s_table, t_table) -> tuple[list, list, list, list]:
    """Per conversation: chunk ids for the student's and the teacher's tokens (-1 outside every chunk), for
    "unconstrained" and "space" chunks, numbered from 0 in answer order."""
    s_n, t_n = len(student["ids"]), len(teacher["ids"])
    out = {
        kind: (np.full(s_n, -1, np.int64), np.full(t_n, -1, np.int64)) for kind in ("chunks", "space_chunks")
    }
    t_spans = {span.turn: span for span in teacher["spans"]}
    counts = dict.fromkeys(out, 0)
    for span in student["spans"]:
        other = t_spans.get(span.turn)
        if other is None:  # the teacher's template rewrites this answer (train_on=last): nothing to align
            continue
        answer = student["text"][span.start : span.answer_end]
        si, ss, se = _answer_tokens(
            student["text"],
            student["offsets"],
            student["ids"],
            s_table,
            span.start,
            span.answer_end,
            "student",
        )
        ti, ts, te = _answer_tokens(
            teacher["text"],
            teacher["offsets"],
            teacher["ids"],
            t_table,
            other.start,
            other.answer_end,
            "teacher",
        )
        if not len(si) or not len(ti):
            continue
        allowed = whitespace_cuts(answer.encode())
        for kind, cut in (("chunks", None), ("space_chunks", allowed)):
            # A conversation's first token has no prediction: a chunk holding one is dropped.
            cs, ct, n = align_chunks(ss, se, ts, te, si > 0, ti > 0, allowed=cut)
            out[kind][0][si] = np.where(cs >= 0, cs + counts[kind], -1)
            out[kind][1][ti] = np.where(ct >= 0, ct + counts[kind], -1)
            counts[kind] += n
    return out["chunks"][0], out["chunks"][1], out["space_chunks"][0], out["space_chunks"][1]


def _rendered(turns, tokenizer, template, data_cfg, seq_len, where) -> dict:
    text, ids, offsets, spans, status = data.encode_conversation(
        turns, tokenizer, template, data_cfg, seq_len, where
    )
    return {"text": text, "ids": ids, "offsets": offsets, "spans": spans, "status": status}


def pack_aligned_chats(
    conversations: list[list[dict]],
    student_tok,
    teacher_tok,
    templates: tuple[str, str],
    data_cfg: DataConfig,
    name: str,
    first_row: int = 0,
    tables=None,
) -> dict[str, list]:
    """Conversations rendered by each side with its own template, in the student's windows of data.seq_len
    (whole conversations packed, or one per window with data.pack: false), with the teacher's tokens of the
    same conversations and the chunk alignment of their answers: the columns of `pack_aligned`. Conversations
    longer than seq_len in the student's rendering are dropped or cut by data.truncation, counted in the
    log."""
    seq_len = data_cfg.seq_len
    s_table = (tables[0] if tables else token_bytes_table(student_tok))[0]
    t_table = (tables[1] if tables else token_bytes_table(teacher_tok))[0]
    pad = student_tok.pad_token_id if student_tok.pad_token_id is not None else student_tok.eos_token_id or 0
    samples, statuses = [], []
    for k, turns in enumerate(conversations):
        turns = [{key: v for key, v in t.items() if v is not None} for t in turns]  # arrow adds absent keys
        where = f"{name} row {first_row + k + 1}"
        student = _rendered(turns, student_tok, templates[0], data_cfg, seq_len, where)
        statuses.append(student["status"])
        if student["status"] == data.DROPPED:
            continue
        # The teacher's rendering is not held to the student's seq_len; it stops where the student's does.
        teacher = _rendered(
            turns, teacher_tok, templates[1], data_cfg, 1 << 30, f"{where} (teacher template)"
        )
        last = {s.turn for s in student["spans"]}
        kept = [s for s in teacher["spans"] if s.turn <= max(last)]
        cut = data._tokens_before(teacher["offsets"], kept[-1].end) if kept else len(teacher["ids"])
        teacher.update(ids=teacher["ids"][:cut], offsets=teacher["offsets"][:cut], spans=kept)
        samples.append((student, teacher, *chat_chunks(student, teacher, s_table, t_table)))
    keys = ["input_ids", "position_ids", "targets", "teacher_input_ids", "teacher_position_ids"]
    keys += [f"{side}_{kind}" for kind in ("chunks", "space_chunks") for side in ("student", "teacher")]
    out: dict[str, list] = {k: [] for k in keys}
    groups, current, used = [], [], 0
    for sample in samples:
        n = len(sample[0]["ids"])
        if current and (not data_cfg.pack or used + n > seq_len):
            groups.append(current)
            current, used = [], 0
        current.append(sample)
        used += n
    if current:
        groups.append(current)
    for group in groups:
        student_samples = [(s["ids"], data._span_mask(s["offsets"], s["spans"])) for s, *_ in group]
        (window,) = data.sample_sequences(student_samples, seq_len, pad, True)
        for key in ("input_ids", "position_ids", "targets"):
            out[key].append(window[key])
        out["teacher_input_ids"].append([i for _, t, *_ in group for i in t["ids"]])
        out["teacher_position_ids"].append([p for _, t, *_ in group for p in range(len(t["ids"]))])
        for kind, (s_col, t_col) in (("chunks", (2, 3)), ("space_chunks", (4, 5))):
            # Position t predicts token t + 1 (conversations never share a chunk id: offset per conversation).
            s_ids, t_ids, offset = [], [], 0
            for sample in group:
                s_c, t_c = sample[s_col], sample[t_col]
                s_ids.extend(np.where(s_c >= 0, s_c + offset, -1).tolist())
                t_ids.extend(np.where(t_c >= 0, t_c + offset, -1).tolist())
                offset += int(max(s_c.max(initial=-1), t_c.max(initial=-1))) + 1
            s_ids += [-1] * (seq_len + 1 - len(s_ids))
            out[f"student_{kind}"].append(s_ids[1 : seq_len + 1])
            out[f"teacher_{kind}"].append([*t_ids[1:], -1])
    data.log_counts(name, statuses, data_cfg)
    return out


def aligned_chat_dataset(
    conversations,
    student_tok,
    teacher_tok,
    templates,
    data_cfg,
    name: str,
    max_teacher_len: int | None = None,
):
    """`pack_aligned_chats` over a `datasets.Dataset` with a `messages` column (cached by `datasets`), the
    teacher columns padded as in `aligned_dataset`, in torch format."""
    tables = (token_bytes_table(student_tok), token_bytes_table(teacher_tok))
    packed = data.cached_map(
        conversations,
        lambda b, idx: pack_aligned_chats(
            b["messages"], student_tok, teacher_tok, templates, data_cfg, name, idx[0], tables
        ),
        batched=True,
        batch_size=2000,
        with_indices=True,
        remove_columns=conversations.column_names,
    )
    return _pad_packed(packed, teacher_tok, name, data_cfg.seq_len, max_teacher_len)
