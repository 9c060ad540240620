"""Chunk alignment between two real tokenizers: the embedded teacher's byte-level BPE, a SentencePiece unigram
model (`▁`, byte fallback) and a byte-level tokenizer, on hand-made texts and random ones (hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmdistill import align, data
from llmdistill.config import DatasetSpec, LLMDistillError
from llmdistill.signal import IGNORE_INDEX

TEXTS = [
    "def f(x):\n    return x + 1\n",
    'print("héllo wörld €5")  # naïve café\n\n\tindent',
    "   leading spaces and trailing   ",
    "snake_case_identifier = CamelCaseThing(123456789)",
    "emoji 🐍🐍 and CJK 漢字 mixed\r\nwindows line",
]


@pytest.fixture(scope="module")
def tokenizers(embedded_tokenizer):
    from llmdistill.embedded import student_tokenizer
    from llmdistill.models import load_tokenizer

    return {
        "bpe": embedded_tokenizer,
        "sp": load_tokenizer(str(student_tokenizer("sp-unigram"))),
        "bytes": load_tokenizer(str(student_tokenizer("bytes"))),
    }


def spans(text, tok):
    ids, start, end = align.text_spans(text, tok)
    return ids, start, end


def check_alignment(text, tok_a, tok_b, table_a, table_b):
    """Cuts exactly where both have a boundary; each byte in exactly one chunk; both sides spell it alike."""
    raw = text.encode()
    ids_a, sa, ea = align.text_spans(text, tok_a, table_a)
    ids_b, sb, eb = align.text_spans(text, tok_b, table_b)
    ca, cb, n = align.align_chunks(sa, ea, sb, eb)
    cuts_a = set(sa.tolist()) | set(ea.tolist())
    cuts_b = set(sb.tolist()) | set(eb.tolist())
    common = sorted(cuts_a & cuts_b)
    if not raw:
        assert n == 0
        return
    assert common[0] == 0 and common[-1] == len(raw)
    assert n == len(common) - 1
    # Every token is in a chunk; chunk c spans exactly [common[c], common[c+1]) on both sides.
    assert (ca >= 0).all() and (cb >= 0).all()
    assert (np.diff(ca) >= 0).all() and (np.diff(cb) >= 0).all()
    covered = np.zeros(len(raw), dtype=int)
    for c in range(n):
        lo, hi = common[c], common[c + 1]
        a_bytes = b"".join(table_a[i] for i, k in zip(ids_a, ca, strict=True) if k == c)
        b_bytes = b"".join(table_b[i] for i, k in zip(ids_b, cb, strict=True) if k == c)
        assert a_bytes == b_bytes == raw[lo:hi]
        covered[lo:hi] += 1
        # No cut inside a chunk is shared by both tokenizations.
        assert not any(lo < p < hi for p in common)
    assert (covered == 1).all()


@pytest.mark.parametrize("pair", [("bpe", "sp"), ("bpe", "bytes"), ("sp", "bytes"), ("bpe", "bpe")])
def test_hand_made_texts(tokenizers, pair):
    a, b = tokenizers[pair[0]], tokenizers[pair[1]]
    ta, tb = align.token_bytes_table(a)[0], align.token_bytes_table(b)[0]
    for text in TEXTS:
        check_alignment(text, a, b, ta, tb)


def test_schemes_and_byte_fallback(tokenizers):
    assert align.tokenizer_scheme(tokenizers["bpe"]) == "byte_level"
    assert align.tokenizer_scheme(tokenizers["sp"]) == "metaspace"
    table, special = align.token_bytes_table(tokenizers["sp"])
    sp = tokenizers["sp"]
    assert table[sp.convert_tokens_to_ids("<0x0A>")] == b"\n"
    assert table[sp.eos_token_id] == b"" and special[sp.eos_token_id]
    # "€" is not a piece: three byte-fallback tokens, one byte each; they align with the BPE's byte tokens.
    chunks = align.align_text(" €", tokenizers["sp"], tokenizers["bpe"])
    sp_pieces = [sp.convert_ids_to_tokens(a) for a, _ in chunks]
    assert sp_pieces == [["▁"], ["<0xE2>"], ["<0x82>"], ["<0xAC>"]]


def test_chunks_where_only_one_side_can_split(tokenizers):
    # The teacher has " return" as one token, the SentencePiece student "▁" + "return": one chunk of both.
    chunks = align.align_text("x\n    return y", tokenizers["sp"], tokenizers["bpe"])
    spelled = [(tokenizers["sp"].decode(a), tokenizers["bpe"].decode(b)) for a, b in chunks]
    assert all(x == y for x, y in spelled)
    assert "".join(x for x, _ in spelled) == "x\n    return y"
    assert any(len(a) > 1 or len(b) > 1 for a, b in chunks)


def test_space_chunks_cut_only_before_whitespace(tokenizers):
    text = 'value = compute(a, b)  # "quoted thing"\nnext_line'
    raw = text.encode()
    chunks = align.align_text(text, tokenizers["sp"], tokenizers["bpe"], kind="space")
    fine = align.align_text(text, tokenizers["sp"], tokenizers["bpe"])
    assert len(chunks) < len(fine)
    at = 0
    for a, _ in chunks:
        if at > 0:
            assert raw[at : at + 1] in (b" ", b"\n")
        at += len(tokenizers["sp"].decode(a).encode())
    assert at == len(raw)


def test_identical_tokenizers_give_single_token_chunks(tokenizers):
    for text in TEXTS:
        for a, b in align.align_text(text, tokenizers["bpe"], tokenizers["bpe"]):
            assert a == b and len(a) == 1


def test_dummy_prefix_and_normalising_tokenizers():
    table = [b"", b" a", b"b", b"A"]
    assert align.document_byte_lengths([1, 2], table, b"ab", "x").tolist() == [1, 1]  # SentencePiece prefix
    with pytest.raises(LLMDistillError, match="normalisation"):
        align.document_byte_lengths([3, 2], table, b"ab", "student")


def test_packed_windows_keep_the_student_path_and_align(tokenizers):
    docs = [TEXTS[0] * 3, TEXTS[1], TEXTS[4] * 2, TEXTS[3]]
    sp, bpe = tokenizers["sp"], tokenizers["bpe"]
    seq_len = 24
    out = align.pack_aligned(docs, sp, bpe, seq_len)
    # The student's keys are exactly what the student-only pipeline packs.
    encoded = [ids + [sp.eos_token_id] for ids in sp(docs, add_special_tokens=True)["input_ids"]]
    plain = data.pack_documents(encoded, seq_len)
    for key in ("input_ids", "position_ids", "targets"):
        assert out[key] == plain[key]
    s_table, _ = align.token_bytes_table(sp)
    t_table, _ = align.token_bytes_table(bpe)
    for w in range(len(out["input_ids"])):
        targets, t_ids = out["targets"][w], out["teacher_input_ids"][w]
        for kind in ("chunks", "space_chunks"):
            s_chunk, t_chunk = out[f"student_{kind}"][w], out[f"teacher_{kind}"][w]
            assert len(t_chunk) == len(t_ids)
            ids = sorted(set(s_chunk) - {-1})
            assert ids == sorted(set(t_chunk) - {-1})
            for c in ids:
                s_bytes = b"".join(s_table[targets[t]] for t in range(seq_len) if s_chunk[t] == c)
                t_bytes = b"".join(t_table[t_ids[j + 1]] for j in range(len(t_ids) - 1) if t_chunk[j] == c)
                assert s_bytes == t_bytes
                # Chunked tokens always have a target: their likelihood is known on both sides.
                assert all(targets[t] != IGNORE_INDEX for t in range(seq_len) if s_chunk[t] == c)
    # Padding the teacher side to a shorter length drops only the chunks it cuts.
    sample = {k: v[1] for k, v in out.items()}
    cut = align.pad_teacher(sample, 8, bpe.pad_token_id)
    assert len(cut["teacher_input_ids"]) == 8
    assert set(cut["student_chunks"]) - {-1} == set(cut["teacher_chunks"]) - {-1}


@pytest.fixture(scope="module")
def tables(tokenizers):
    return {k: align.token_bytes_table(t)[0] for k, t in tokenizers.items()}


TEXT = st.text(
    alphabet=st.one_of(
        st.sampled_from(list(" \n\t  abcdefxyz_()=:.,\"'#0123456789ABC")),
        # Not U+2581: SentencePiece writes spaces as "▁", so a literal one cannot be spelled back (such
        # documents are left out of cross-tokenizer data, see align.MAX_UNSPELLABLE).
        st.characters(
            min_codepoint=0x80, max_codepoint=0x2FFF, exclude_categories=("Cs",), exclude_characters="\u2581"
        ),
        st.sampled_from(["🐍", "€", "é", "漢"]),
    ),
    max_size=80,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT, pair=st.sampled_from([("bpe", "sp"), ("sp", "bytes"), ("bpe", "bytes")]))
def test_property_random_texts(tokenizers, tables, text, pair):
    a, b = pair
    check_alignment(text, tokenizers[a], tokenizers[b], tables[a], tables[b])


def test_a_document_a_tokenizer_cannot_spell_back_is_left_out_not_fatal(tokenizers):
    from llmdistill.align import MAX_UNSPELLABLE, pack_aligned

    texts = [f"def f{i}(x):\n    return x + {i}\n" * 8 for i in range(120)]
    # SentencePiece writes spaces as "▁", so a literal one decodes as a space: no SentencePiece tokenizer can
    # spell this document back.
    texts[7] = "state_\u2581[x] = 1\n" * 8
    assert 1 < MAX_UNSPELLABLE * len(texts)
    packed = pack_aligned(texts, tokenizers["sp"], tokenizers["bpe"], seq_len=32)
    assert packed["input_ids"]
    with pytest.raises(LLMDistillError, match="spell the text back"):
        pack_aligned(texts[:20], tokenizers["sp"], tokenizers["bpe"], seq_len=32)  # 1 in 20 is too many


def test_special_token_strings_in_train_documents_are_aligned_not_left_out(tokenizers, tables, caplog):
    """Train documents 331 and 540 hold a literal `<s>`; the SentencePiece student once read it as its BOS."""
    import json

    lookalikes = {t for tok in tokenizers.values() for t in tok.all_special_tokens} | {"<0x"}
    train = [json.loads(row)["text"] for row in data.embedded_corpus()["train"].open()]
    texts = [t for t in train if any(s in t for s in lookalikes)]
    assert len(texts) >= 2
    for name, tok in tokenizers.items():
        *_, unspellable = align._tokenize_documents(texts, tok, tables[name], name)
        assert unspellable == {}, name
    with caplog.at_level("WARNING", logger="llmdistill.align"):
        packed = align.pack_aligned(texts, tokenizers["sp"], tokenizers["bpe"], seq_len=256)
    assert packed["input_ids"] and "left out" not in caplog.text


# ------------------------------------------------------------------------------ chats

# Each side renders the same conversation with its own template: the embedded BPE with the embedded chat
# template, the SentencePiece student with a Llama-2-like one of its own special tokens.
SP_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}### {{ m.role }}:\n{{ m.content }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}### assistant:\n{% endif %}"
)
ANSWERS = ["def add(a, b):\n    return a + b", "Returns the sum: naïve but fine ✓.", "x = [1, 2]  # two\n"]
CONVERSATIONS = [
    [
        {"role": "system", "content": "Answer with code."},
        # the user quotes an answer's text: it is still outside every chunk
        {"role": "user", "content": "Write add, like def add(a, b):\n    return a + b"},
        {"role": "assistant", "content": ANSWERS[0]},
        {"role": "user", "content": "What does it do?"},
        {"role": "assistant", "content": ANSWERS[1]},
    ],
    [{"role": "user", "content": "A list of two."}, {"role": "assistant", "content": ANSWERS[2]}],
]


@pytest.mark.parametrize("pack", [True, False])
def test_chat_chunks_lie_inside_the_answers_and_tile_them(tokenizers, pack):
    from llmdistill.config import DataConfig
    from llmdistill.embedded import EMBEDDED_CHAT_TEMPLATE

    sp, bpe = tokenizers["sp"], tokenizers["bpe"]
    templates = (SP_TEMPLATE, EMBEDDED_CHAT_TEMPLATE.read_text())
    cfg = DataConfig(seq_len=200, pack=pack)
    out = align.pack_aligned_chats(CONVERSATIONS * 2, sp, bpe, templates, cfg, "chats")
    assert len(out["input_ids"]) == (2 if pack else 4)  # 132 + 45 student tokens per pair
    s_table, _ = align.token_bytes_table(sp)
    t_table, _ = align.token_bytes_table(bpe)
    chunked_text = []
    for w in range(len(out["input_ids"])):
        targets, t_ids = out["targets"][w], out["teacher_input_ids"][w]
        for kind in ("chunks", "space_chunks"):
            s_chunk, t_chunk = out[f"student_{kind}"][w], out[f"teacher_{kind}"][w]
            ids = sorted(set(s_chunk) - {-1})
            assert ids == sorted(set(t_chunk) - {-1})
            text = b""
            for c in ids:
                s_bytes = b"".join(s_table[targets[t]] for t in range(len(targets)) if s_chunk[t] == c)
                t_bytes = b"".join(t_table[t_ids[j + 1]] for j in range(len(t_ids) - 1) if t_chunk[j] == c)
                assert s_bytes == t_bytes and s_bytes
                text += s_bytes
            if kind == "chunks":
                chunked_text.append(text)
            # Every chunked student token is a trained target.
            assert all(targets[t] != IGNORE_INDEX for t in range(len(targets)) if s_chunk[t] >= 0)
    # The chunks, in order, are the answers' text (less surrounding whitespace, as the masks see it) and
    # nothing else: template tokens, system and user turns are in none, and no answer byte is left out.
    assert b"".join(chunked_text) == "".join(a.strip() for a in ANSWERS * 2).encode()
    # The student's columns are what the student-only chat pipeline makes of its own rendering.
    rows = [{"messages": conv} for conv in CONVERSATIONS * 2]
    spec = DatasetSpec(path="x", format="messages")
    encode = data.row_encoder(spec, DataConfig(seq_len=200, pack=pack, chat_template=SP_TEMPLATE), sp, 200)
    samples = [encode(r, i)[:2] for i, r in enumerate(rows)]
    plain = data._columns(data.sample_sequences(samples, 200, sp.pad_token_id, pack))
    for key in ("input_ids", "position_ids", "targets"):
        assert out[key] == plain[key]
