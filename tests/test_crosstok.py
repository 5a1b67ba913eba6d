"""Cross-tokenizer KD: byte alignment, the vocabulary map, the loss, and a real run across tokenizers."""

from __future__ import annotations

import json
import random

import pytest
import torch

from stratos.distill import Objective, OutputHead, distill, kd_terms
from stratos.distill.crosstok import (
    CrossHead,
    CrossTokenizerSignal,
    VocabMap,
    align,
    byte_offsets,
    pair_records,
    token_bytes,
    measure_mapping,
    uld_distance,
)
from stratos.distill.data import IGNORE, collate, encode
from stratos.models.tiny import build_tokenizer, tiny_llama
from stratos.spec import DistillSpec
from stratos.teachers.signal import OnlineTeacher

CORPUS = ["hello world", "the answer is 42", "2+3=5", "héllo wörld", "1m2m3m 4p5p6p"] * 20


@pytest.fixture(scope="module")
def bytelevel():
    return build_tokenizer(CORPUS, vocab_size=300)


@pytest.fixture(scope="module")
def spiece():
    return build_tokenizer(CORPUS, vocab_size=400, style="sentencepiece")


@pytest.fixture(scope="module")
def gemma_like():
    """SentencePiece with byte fallback and no dummy prefix, as Gemma's."""
    return build_tokenizer(CORPUS, vocab_size=400, style="sentencepiece", dummy_prefix=False)


def _offsets(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return tok.convert_ids_to_tokens(ids), byte_offsets(tok, text, ids)


# ------------------------------------------------------------------------------------------ alignment


def test_align_hand_made_offsets():
    # "abcde": student a|bc|de, teacher abc|d|e -> spans [0,3) [3,5)
    al = align([(0, 1), (1, 3), (3, 5)], [(0, 3), (3, 4), (4, 5)], 5)
    assert al.bounds == [0, 3, 5]
    assert al.student_span == [0, 0, 1] and al.teacher_span == [0, 1, 1]
    assert al.pairs == [(0, 0), (2, 1)]
    # How the teacher spells the student token that starts each span: 'a' ends inside 'abc' (0: the student
    # splits it), 'de' is 'd' + 'e' (two teacher tokens).
    assert al.spelling(0, 0) == 0 and al.spelling(2, 1) == 2
    # A zero-length token (a dummy-prefix '▁') belongs to the span it starts.
    al = align([(0, 0), (0, 2)], [(0, 1), (1, 2)], 2)
    assert al.bounds == [0, 2] and al.student_span == [0, 0] and al.pairs == [(0, 0)]


def test_byte_offsets_multibyte_and_byte_fallback(bytelevel, spiece):
    text = "héllo 🀄"  # é is 2 bytes, the tile 4: split into bytes differently on each side
    s_pieces, s_off = _offsets(bytelevel, text)
    t_pieces, t_off = _offsets(spiece, text)
    assert s_pieces[0] == "hÃ©llo" and s_off[0] == (0, 6)  # byte-level: é inside one token
    assert t_pieces[:4] == ["▁h", "<0xC3>", "<0xA9>", "llo"]  # byte fallback splits é into its two bytes
    assert t_off[:4] == [(0, 1), (1, 2), (2, 3), (3, 6)]  # the dummy-prefix space is no byte of the text
    assert t_pieces[-4:] == ["<0xF0>", "<0x9F>", "<0x80>", "<0x84>"] and t_off[-4:] == [(7, 8), (8, 9), (9, 10), (10, 11)]
    al = align(s_off, t_off, len(text.encode()))
    # "héllo" is one span: one student token, four teacher tokens, which spell it together.
    assert al.bounds[:2] == [0, 6] and al.teacher_span[:4] == [0, 0, 0, 0] and al.pairs[0] == (0, 0)
    assert al.spelling(0, 0) == 4


def test_byte_offsets_leading_spaces(bytelevel, spiece):
    text = " two  spaces"
    s_pieces, s_off = _offsets(bytelevel, text)
    t_pieces, t_off = _offsets(spiece, text)
    assert s_pieces[:2] == ["Ġ", "t"] and t_pieces[0] == "▁t"  # Ġ and ▁ are both the byte 0x20
    al = align(s_off, t_off, len(text.encode()))
    assert al.bounds[:2] == [0, 2] and al.student_span[:2] == [0, 0]  # "Ġ" + "t" against "▁t"


def test_spans_cover_every_byte_once_property(bytelevel, spiece):
    """Random texts: the spans tile the bytes, and each side's tokens of a span spell exactly its bytes."""
    rng = random.Random(0)
    alphabet = list("abcdehlorw 0123456789+=") + ["é", "ö", "€", "🀄", "  ", "\n"]
    s_pieces, t_pieces = token_bytes(bytelevel), token_bytes(spiece)
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        data = text.encode()
        sides = []
        for tok, pieces in ((bytelevel, s_pieces), (spiece, t_pieces)):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            sides.append((ids, pieces, byte_offsets(tok, text, ids, pieces)))
        al = align(sides[0][2], sides[1][2], len(data))
        assert al.bounds[0] == 0 and al.bounds[-1] == len(data)
        assert all(a < b for a, b in zip(al.bounds, al.bounds[1:])), (text, al.bounds)
        for (ids, pieces, offs), span_of in ((sides[0], al.student_span), (sides[1], al.teacher_span)):
            for k in range(len(al.bounds) - 1):
                own = b"".join(pieces[i] for i, s in zip(ids, span_of) if s == k)
                own = own[1:] if k == 0 and own.startswith(b" ") and not data.startswith(b" ") else own  # dummy prefix
                assert own == data[al.bounds[k] : al.bounds[k + 1]], (text, k)
        assert len(al.pairs) == len(al.bounds) - 1  # every span has a first token on both sides


def test_pair_records_templates_and_eos(bytelevel, gemma_like):
    """Each side wraps the response in its own prompt; the first response targets and the EOS pair up. A
    span start whose student token the teacher spells with more tokens than the chain follows (max_chain)
    trains on CE alone: 'héllo' is one student token and four teacher tokens, so with a chain of three the
    teacher's mass would stop on a shorter token than the one the student must write; with four it is
    followed, and the chain holds the span's next three teacher positions and its first three tokens."""
    recs = [{"prompt": "2+3=", "response": "héllo 5"}, {"text": "hello world"}]
    followed = pair_records(recs, bytelevel, gemma_like, max_length=64, max_chain=4)
    assert followed.target_map[0][0] >= 0 and followed.stats["beyond_chain"] == 0
    t_ids = gemma_like("héllo 5", add_special_tokens=False)["input_ids"]
    start = followed.target_map[0][0]
    assert followed.chain_targets[0][0].tolist() == [start + 1, start + 2, start + 3]
    assert followed.chain_tokens[0][0].tolist() == t_ids[:3]
    paired = pair_records(recs, bytelevel, gemma_like, max_length=64, max_chain=3)
    s_ex, t_ex = encode(recs, bytelevel, 64)[0], encode(recs, gemma_like, 64)[0]
    assert [e.input_ids for e in paired.student] == [e.input_ids for e in s_ex]
    assert [e.input_ids for e in paired.teacher] == [e.input_ids for e in t_ex]
    for row, s, t in zip(paired.target_map, s_ex, t_ex):
        assert len(row) == s.num_targets
        assert row[-1] == t.num_targets - 1  # EOS <-> EOS
        kept = [x for x in row if x >= 0]
        assert all(b > a for a, b in zip(kept, kept[1:]))
    assert paired.target_map[0][0] == -1 and paired.target_map[1][0] == 0  # 'héllo' (four) / 'hello' (one)
    assert paired.stats["beyond_chain"] == 1


def test_a_dummy_prefix_on_one_side_leaves_the_first_span_to_ce(bytelevel, spiece, gemma_like):
    """A Llama 2 style SentencePiece tokenizer writes 'hello' alone as '▁hello', with a space the text does not have;
    the other side writes 'hello'. The map goes by bytes, so it would credit the student's '▁hello' with the
    teacher's ' hello' (not what it writes there), or the teacher's '▁hello' to the student's ' hello': the first
    span trains on CE, the rest pairs as usual, on records and on-policy samples; with the prefix on both sides or
    neither, the first span pairs."""
    from stratos.distill.crosstok import SampledCrossSignal, adds_dummy_prefix

    assert adds_dummy_prefix(spiece) and not adds_dummy_prefix(gemma_like) and not adds_dummy_prefix(bytelevel)
    assert spiece.convert_ids_to_tokens(spiece("hello", add_special_tokens=False)["input_ids"]) == ["▁hello"]
    recs = [{"prompt": "2+3=", "response": "hello world"}, {"prompt": "hi", "response": "the answer is 42"}]
    for student, teacher in ((spiece, bytelevel), (bytelevel, spiece), (spiece, gemma_like)):
        rows = pair_records(recs, student, teacher, max_length=64).target_map
        assert all(r[0] == -1 and all(x >= 0 for x in r[1:]) for r in rows), (student, teacher, rows)
        teacher_model = OnlineTeacher(tiny_llama(teacher, hidden_size=32, num_hidden_layers=1))
        vmap = VocabMap.build(student, teacher, student_rows=len(student), teacher_rows=len(teacher))
        sampled = SampledCrossSignal(teacher_model, recs, student, teacher, vmap, teacher_pad_id=teacher.pad_token_id)
        ids = student("hello world", add_special_tokens=False)["input_ids"] + [student.eos_token_id]
        assert sampled._pair_row(recs[0], ids)[1][0][0] == -1
    for student, teacher in ((spiece, spiece), (bytelevel, gemma_like)):
        assert all(r[0] >= 0 for r in pair_records(recs, student, teacher, max_length=64).target_map)


def test_a_teacher_that_ends_its_turn_in_text_leaves_the_students_eos_to_ce(bytelevel):
    """A base model's tokenizer on the ChatML fallback (no <|im_end|> token: Gemma 3 270M's GGUF) closes a turn
    by writing '<|im_end|>' as text, so its distribution at the response's end says nothing about its EOS: the
    student's EOS is left to CE (-1), on the records' pairing and on on-policy samples alike; every other
    target pairs as with a teacher whose EOS ends its turn."""
    from stratos.distill.crosstok import SampledCrossSignal, pairs_eos

    base = build_tokenizer(CORPUS, vocab_size=300, chatml=False)
    assert not pairs_eos(base) and pairs_eos(bytelevel)
    recs = [{"prompt": "2+3=", "response": "the answer is 5"}, {"prompt": "hi", "response": "hello world"}]
    text_end = pair_records(recs, bytelevel, base, max_length=64)
    with_eos = pair_records(recs, bytelevel, bytelevel, max_length=64)
    for row, same in zip(text_end.target_map, with_eos.target_map):
        assert row[-1] == -1 and same[-1] >= 0
        assert row[:-1] == same[:-1] and all(x >= 0 for x in row[:-1])
    teacher = OnlineTeacher(tiny_llama(base, hidden_size=32, num_hidden_layers=1))
    vmap = VocabMap.build(bytelevel, base, student_rows=len(bytelevel), teacher_rows=len(base))
    sampled = SampledCrossSignal(teacher, recs, bytelevel, base, vmap, teacher_pad_id=base.pad_token_id)
    ids = bytelevel("hello world", add_special_tokens=False)["input_ids"] + [bytelevel.eos_token_id]
    _, paired = sampled._pair_row(recs[1], ids)
    assert paired[0][-1] == -1 and all(x >= 0 for x in paired[0][:-1])


def test_a_teacher_prompt_longer_than_max_length_still_reads_the_whole_response(bytelevel, spiece):
    """max_length bounds the student's example; the teacher reads the same response whatever its own prompt's
    length (context distillation: worked examples in teacher_messages, here several times max_length). Every
    student target pairs as it does without the context, and the teacher's example ends at its EOS target;
    on-policy pairing (SampledCrossSignal) reads the same teacher rows."""
    from stratos.distill.crosstok import SampledCrossSignal

    shots = []
    for a in range(6):
        shots += [{"role": "user", "content": f"what is {a} + 1?"}, {"role": "assistant", "content": f"the answer is {a + 1}"}]
    plain = [{"prompt": "what is 11 + 1?", "response": "the answer is 12"}]
    ctx = [{**plain[0], "teacher_messages": [*shots, {"role": "user", "content": "what is 11 + 1?"}]}]
    s_len = len(encode(plain, bytelevel, 10**6)[0][0].input_ids)
    with_ctx, without = pair_records(ctx, bytelevel, spiece, s_len), pair_records(plain, bytelevel, spiece, s_len)
    assert len(encode([{"messages": [*ctx[0]["teacher_messages"], {"role": "assistant", "content": "x"}]}],
                      spiece, 10**6)[0][0].input_ids) > 3 * s_len
    assert with_ctx.target_map == without.target_map and with_ctx.stats["aligned_share"] > 0.5
    t_ex = with_ctx.teacher[0]
    assert t_ex.labels[-1] == spiece.eos_token_id and t_ex.num_targets == without.teacher[0].num_targets
    assert t_ex.input_ids[-t_ex.num_targets:] == without.teacher[0].input_ids[-t_ex.num_targets:]
    vm = VocabMap.build(bytelevel, spiece, student_rows=len(bytelevel), teacher_rows=len(spiece))
    online = OnlineTeacher(tiny_llama(spiece, seed=3))
    up_front = CrossTokenizerSignal(online, with_ctx, vm, teacher_pad_id=spiece.pad_token_id)
    sampled = SampledCrossSignal(online, ctx, bytelevel, spiece, vm, teacher_pad_id=spiece.pad_token_id)
    batch = collate(with_ctx.student, [0], bytelevel.pad_token_id)
    # The same rows, each computed by its own forward: MKL's sums can run in another order with the buffers'
    # alignment and the batch (torch.equal failed about one run in fifteen, by up to 3e-6), so to float rounding.
    torch.testing.assert_close(sampled.hidden(batch), up_front.hidden(batch), rtol=1e-4, atol=1e-5)
    assert sampled.paired.teacher == [] and sampled._paired[1].teacher[0].input_ids == t_ex.input_ids


# ------------------------------------------------------------------------------------------ the map and the loss


def test_vocab_map_by_bytes(bytelevel, spiece):
    vm = VocabMap.build(bytelevel, spiece, student_rows=len(bytelevel), teacher_rows=len(spiece))
    s_vocab, t_vocab = bytelevel.get_vocab(), spiece.get_vocab()
    assert vm.t2s[t_vocab["▁world"]] == s_vocab["Ġworld"]  # the same bytes spelt two ways
    assert vm.t2s[t_vocab["<0xC3>"]] == s_vocab["Ã"]  # a byte-fallback token is its byte
    assert vm.t2s[spiece.eos_token_id] == bytelevel.eos_token_id
    assert vm.t2s[spiece.pad_token_id] == bytelevel.pad_token_id  # special tokens of the same name
    assert 0 < vm.stats["vocab_overlap"] < 1


def test_the_map_sends_mass_to_the_token_the_student_writes(bytelevel, spiece, tmp_path):
    """A byte-fallback vocabulary (Gemma's, Llama 2's) spells a character twice: '<0x3A>' and ':'. The map, the
    chain table and the top-k table take the token the tokenizer writes, never the byte-fallback piece where a
    token of its own exists (a student taught the piece writes text its tokenizer never does: a pretrained
    Gemma student so taught answered nothing). Trained by KD alone from a teacher of another tokenizer, the
    student's top token at the data's positions is then never such a piece."""
    from stratos.distill.crosstok import ids_by_bytes
    from stratos.teachers.topk import vocab_by_bytes

    fallback = {i for piece, i in spiece.get_vocab().items() if piece.startswith("<0x")}
    s_vocab, t_vocab = spiece.get_vocab(), bytelevel.get_vocab()
    assert {"h", "4", ":"} <= s_vocab.keys() and s_vocab["<0x68>"] < s_vocab["h"]  # the piece has the lower id
    vm = VocabMap.build(spiece, bytelevel, student_rows=len(spiece), teacher_rows=len(bytelevel))
    for ch in ("h", "4"):
        assert vm.t2s[t_vocab[ch]] == s_vocab[ch] and vocab_by_bytes(spiece)[ch.encode()] == s_vocab[ch]
    assert vm.t2s[t_vocab["Ã"]] == s_vocab["<0xC3>"]  # part of a character: the piece is the only token
    table = ids_by_bytes(spiece)
    assert not any(i in fallback for b, i in table.items() if len(b) == 1 and b[0] < 0x80 and
                   any(j not in fallback for j, x in enumerate(token_bytes(spiece)) if x == b))
    # A real run: KD alone (kd_ratio 1) from a bytelevel teacher that knows the answers.
    recs = [{"prompt": f"{a}+{b}=", "response": f"h:{a + b}"} for a in range(10) for b in range(4)]
    opts = dict(per_device_train_batch_size=8, learning_rate=3e-3, logging_steps=10, report_to=[], bf16=False,
                warmup_ratio=0.0)
    teacher = tiny_llama(bytelevel, seed=3, hidden_size=48)
    distill(teacher, bytelevel, recs, DistillSpec(algorithm="sft", max_steps=40, **opts), tmp_path / "t", progress=False)
    student = tiny_llama(spiece, seed=4, hidden_size=48)
    distill(student, spiece, recs, DistillSpec(loss="fkl", kd_ratio=1.0, max_steps=40, **opts), tmp_path / "s",
            teacher=teacher, teacher_tokenizer=bytelevel, progress=False)
    examples, _ = encode(recs, spiece, 64)
    batch = collate(examples, list(range(len(examples))), spiece.pad_token_id)
    with torch.no_grad():
        top = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].argmax(-1)
    written = top[batch.target_mask]
    assert not any(int(t) in fallback for t in written)  # the map before: 80 of these 164 were pieces
    second = batch.target_mask & (batch.target_mask.cumsum(1) == 2)  # each row's ':', as the data writes it
    assert (top[second] == s_vocab[":"]).all() and (batch.labels[:, 1:][second] == s_vocab[":"]).all()


def test_uld_distance_is_sorted_l1():
    q = torch.tensor([[0.7, 0.2, 0.1]])
    p = torch.tensor([[0.05, 0.15, 0.5, 0.3]])
    # sorted: q (0.7, 0.2, 0.1, 0), p (0.5, 0.3, 0.15, 0.05)
    expect = 0.2 + 0.1 + 0.05 + 0.05
    assert torch.allclose(uld_distance(q, p), torch.tensor([expect]))
    assert torch.allclose(uld_distance(p, q), torch.tensor([expect]))
    # A side given at full width with the entries it leaves out at zero (how CrossHead passes the
    # teacher's unmapped tokens) gives the same distance as those entries cut out.
    wide = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2]])
    assert torch.allclose(uld_distance(q, wide), uld_distance(q, wide[:, [1, 3, 4]]))
    assert torch.allclose(uld_distance(wide, q), uld_distance(wide[:, [1, 3, 4]], q))
    assert torch.allclose(uld_distance(p, wide), uld_distance(p, wide[:, [1, 3, 4]]))  # 4 sorted against 3


@pytest.mark.parametrize("loss", ["fkl", "rkl", "jsd"])
def test_one_tokenizer_gives_the_plain_loss(bytelevel, loss):
    """With the same tokenizer on both sides, the cross-tokenizer path is the plain path, to 1e-6."""
    torch.manual_seed(0)
    v = len(bytelevel)
    s_head = OutputHead(torch.nn.Parameter(torch.randn(v, 16) * 0.5))
    t_head = OutputHead(torch.randn(v, 24) * 0.5)
    vm = VocabMap.build(bytelevel, bytelevel, student_rows=v, teacher_rows=v)
    assert vm.stats["mapped_teacher_tokens"] == v  # every token, specials included
    cross = CrossHead(t_head, vm, "hybrid")
    h_s, h_t = torch.randn(40, 16, requires_grad=True), torch.randn(40, 24)
    targets = torch.randint(0, v, (40,))
    obj = Objective(loss=loss, kd_ratio=0.7, temperature=2.0, chunk_size=16)
    plain = kd_terms(h_s, h_t, targets, s_head, t_head, obj)
    g_plain = torch.autograd.grad(plain["loss"], [h_s])[0]
    crossed = kd_terms(h_s, h_t, targets, s_head, cross, obj, kd_mask=torch.ones(40, dtype=torch.bool))
    g_cross = torch.autograd.grad(crossed["loss"], [h_s])[0]
    for k in ("loss", "kd", "ce", "agree"):
        assert torch.allclose(crossed[k], plain[k], rtol=1e-6, atol=0), (k, crossed[k], plain[k])
    ratio = float((g_cross - g_plain).abs().max() / g_plain.abs().max())  # closed form against autograd
    assert ratio <= 1e-5, f"gradient off by {ratio:.2e} of its largest entry"


def test_unaligned_positions_train_on_ce(bytelevel, spiece):
    torch.manual_seed(0)
    s_head = OutputHead(torch.nn.Parameter(torch.randn(len(bytelevel), 16)))
    vm = VocabMap.build(bytelevel, spiece, student_rows=len(bytelevel), teacher_rows=len(spiece))
    cross = CrossHead(OutputHead(torch.randn(len(spiece), 8)), vm)
    h_s, h_t, targets = torch.randn(6, 16), torch.randn(6, 8), torch.randint(0, len(bytelevel), (6,))
    mask = torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool)
    obj = Objective(loss="fkl", kd_ratio=1.0)
    out = kd_terms(h_s, h_t, targets, s_head, cross, obj, kd_mask=mask)
    ce = torch.nn.functional.cross_entropy(s_head(h_s), targets, reduction="none")
    kd_only = kd_terms(h_s[mask], h_t[mask], targets[mask], s_head, cross, obj)
    # kd_ratio 1: the aligned tokens' KD, plus the full CE of the three tokens without a teacher counterpart
    assert torch.allclose(out["loss"], kd_only["kd"] + ce[~mask].sum(), rtol=1e-5)
    assert torch.allclose(out["kd"], kd_only["kd"], rtol=1e-6)


def test_signal_with_one_tokenizer_is_the_online_teacher(bytelevel):
    teacher = tiny_llama(bytelevel, seed=1)
    recs = [{"prompt": f"{a}+{a}=", "response": f"{2 * a}"} for a in range(6)]
    paired = pair_records(recs, bytelevel, bytelevel, 64, max_chain=3)
    assert all(row == list(range(len(row))) for row in paired.target_map)
    vm = VocabMap.build(bytelevel, bytelevel, student_rows=len(bytelevel), teacher_rows=len(bytelevel))
    online = OnlineTeacher(teacher)
    sig = CrossTokenizerSignal(online, paired, vm, teacher_pad_id=bytelevel.pad_token_id)
    assert paired.chain_prefixes == []  # the caller's paired data is left as it was; the signal holds a copy
    assert len(sig.paired.chain_prefixes) == len(paired.student)
    batch = collate(paired.student[:4], [0, 1, 2, 3], bytelevel.pad_token_id)
    rows, d = sig.hidden(batch), teacher.config.hidden_size
    assert torch.equal(rows[:, :d], online.hidden(batch))  # the span starts: every target, one to one
    levels = paired.max_chain
    assert rows.shape[1] == levels * d + 2 * (levels - 1)
    assert not rows[:, d:levels * d].any() and bool((rows[:, levels * d:] == -1).all())  # no span goes on
    assert bool(sig.kd_mask(batch).all())


def test_chained_mass_follows_the_teachers_tokens_level_by_level():
    """Teacher tokens [a, x, y, z], student tokens [a, ax, axy, w], the text's teacher tokens a, x, y in one
    span. Level 1: 'ax' gets p(a) p(x | a), taken off 'a'. Level 2: 'axy' gets p(a) p(x | a) p(y | ax),
    taken off 'ax', where that prefix's mass now is. With a chain of two only level 1 moves."""
    p = torch.tensor([[0.5, 0.2, 0.2, 0.1]])
    q1, q2 = torch.tensor([0.1, 0.6, 0.2, 0.1]), torch.tensor([0.3, 0.1, 0.5, 0.1])
    t_bytes = [b"a", b"x", b"y", b"z"]
    prefixes = {b"a": 0, b"ax": 1}
    chain = torch.tensor([[0, 1, 1], [1, 2, 2]])  # (prefix 'a', x, 'ax'), (prefix 'ax', y, 'axy')
    vm = VocabMap(torch.tensor([0, -1, -1, -1]), 4, chain=chain, prefixes=prefixes, teacher_bytes=t_bytes)
    tokens = torch.tensor([[0, 1]])  # the span's teacher tokens a, x (then y)
    assert vm.prefix_ids(tokens).tolist() == [[0, 1]] and vm.prefix_ids(torch.tensor([[2, 0]])).tolist() == [[-1, -1]]

    def row(levels, hidden, toks, pids):
        return torch.cat([torch.zeros(1, 4), *[torch.log(q)[None] for q in hidden], torch.tensor([toks + pids])], -1)

    three = CrossHead(OutputHead(torch.eye(4)), vm, levels=3)
    assert three.image.tolist() == [0, 1, 2]  # categories: a, ax, axy; then "other"
    p_cat, rest = three.project(p.clone(), row(3, [q1, q2], [0.0, 1.0], [0.0, 1.0]), temperature=1.0)
    assert torch.allclose(p_cat, torch.tensor([[0.5 - 0.3, 0.3 - 0.15, 0.15, 0.5]]))
    assert torch.allclose(rest, p)  # a maps, so nothing left "other"
    two = CrossHead(OutputHead(torch.eye(4)), vm, levels=2)
    p_cat, _ = two.project(p.clone(), row(2, [q1], [0.0], [0.0]), temperature=1.0)
    assert torch.allclose(p_cat, torch.tensor([[0.2, 0.3, 0.0, 0.5]]))
    # Without a second teacher token in the span (-1), nothing moves.
    p_cat, _ = three.project(p.clone(), row(3, [q1, q2], [-1.0, -1.0], [-1.0, -1.0]), temperature=1.0)
    assert torch.allclose(p_cat, torch.tensor([[0.5, 0.0, 0.0, 0.5]]))
    # Where a maps nowhere, its mass is "other", and what moves on is taken off a in the rest too.
    unmapped = VocabMap(torch.tensor([-1, -1, -1, -1]), 4, chain=chain, prefixes=prefixes, teacher_bytes=t_bytes)
    head = CrossHead(OutputHead(torch.eye(4)), unmapped, levels=3)
    p_cat, rest = head.project(p.clone(), row(3, [q1, q2], [0.0, 1.0], [0.0, 1.0]), temperature=1.0)
    assert head.image.tolist() == [1, 2]
    assert torch.allclose(p_cat, torch.tensor([[0.15, 0.15, 1.0 - 0.3]]))
    assert torch.allclose(rest, torch.tensor([[0.5 - 0.3, 0.2, 0.2, 0.1]]))


def test_longer_chains_train_end_to_end(bytelevel, gemma_like):
    """With chains of four, 'héllo' (four teacher tokens) is distilled: its category exists only where a
    chain reaches it, the KD term is finite and its gradient reaches the student."""
    teacher = tiny_llama(gemma_like, seed=5)
    student = tiny_llama(bytelevel, seed=6)
    recs = [{"prompt": "say it", "response": "héllo 5"}, {"prompt": "2+3=", "response": "the answer is 5"}]
    paired = pair_records(recs, bytelevel, gemma_like, 64, max_chain=4)
    vm = VocabMap.build(bytelevel, gemma_like, student_rows=len(bytelevel), teacher_rows=len(gemma_like))
    sig = CrossTokenizerSignal(OnlineTeacher(teacher), paired, vm, teacher_pad_id=gemma_like.pad_token_id)
    assert sig.head.levels == 4 and bool(sig.head.chained_only.any())
    batch = collate(paired.student, [0, 1], bytelevel.pad_token_id)
    mask = sig.kd_mask(batch)
    assert bool(mask[0])  # 'héllo' starts a span KD applies at
    h = student.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    out = kd_terms(h[:, :-1][batch.target_mask], sig.hidden(batch), batch.targets, OutputHead.from_model(student),
                   sig.head, Objective(loss="fkl"), kd_mask=mask)
    assert torch.isfinite(out["loss"]) and float(out["kd"]) > 0
    out["loss"].backward()
    assert student.model.embed_tokens.weight.grad.abs().sum() > 0


def test_chain_table_by_bytes(bytelevel, spiece):
    """Every entry of the table spells its student token: its prefix's bytes and then one teacher token's,
    for student tokens that no single teacher token spells."""
    vm = VocabMap.build(bytelevel, spiece, student_rows=len(bytelevel), teacher_rows=len(spiece))
    s_bytes, t_bytes = token_bytes(bytelevel), token_bytes(spiece)
    spelt = {v: k for k, v in vm.prefixes.items()}
    assert vm.chain.shape[0] > 0 and vm.stats["chained_student_tokens"] == len(set(vm.chain[:, 2].tolist()))
    for pid, x, s_id in vm.chain.tolist():
        assert s_bytes[s_id] == spelt[pid] + t_bytes[x] and s_bytes[s_id] not in t_bytes


# ------------------------------------------------------------------------------------------ a real run


def test_distill_across_tokenizers_learns_the_teacher(tmp_path, bytelevel, spiece):
    """A student with a byte-level tokenizer distils a teacher with a SentencePiece one: the run uses
    cross-tokenizer KD (not SFT on text), records the map, and its KD term falls as it trains."""
    torch.manual_seed(0)
    recs = [{"prompt": f"{a}+{b}=", "response": f"the answer is {a + b}"} for a in range(12) for b in range(4)]
    teacher = tiny_llama(spiece, seed=3, hidden_size=48)
    opts = dict(per_device_train_batch_size=8, learning_rate=3e-3, logging_steps=5, report_to=[], bf16=False,
                warmup_ratio=0.0)
    # A teacher that knows the answers (SFT in its own tokens), so there is something to distil.
    distill(teacher, spiece, recs, DistillSpec(algorithm="sft", max_steps=40, **opts), tmp_path / "teacher",
            progress=False)
    student = tiny_llama(bytelevel, seed=4)
    cfg = DistillSpec(loss="fkl", kd_ratio=1.0, max_steps=40, **opts)
    res = distill(student, bytelevel, recs, cfg, tmp_path / "run", teacher=teacher, teacher_tokenizer=spiece,
                  cache_root=tmp_path / "cache", progress=False)
    info = res.signal["ctkd"]
    assert res.signal["mode"] == "cached" and info["method"] == "hybrid" and info["max_chain"] == 2
    assert 0 < info["aligned_share"] < 1 and info["mapped_teacher_tokens"] > 0

    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    kd = [r["kd"] for r in rows if "kd" in r]
    assert kd[-1] < 0.5 * kd[0], kd


def test_sampled_rows_pair_as_the_same_text_paired_up_front(bytelevel, gemma_like):
    """gkd's and opd's samples exist only once drawn: SampledCrossSignal reads a row's response back from its
    tokens and pairs it when the batch comes. A row holding the student's tokens of a record's response
    gives the same teacher rows as pairing that record up front; a sample cut short (no EOS, inside a
    two-byte character) pairs the targets it has."""
    from stratos.distill.crosstok import SampledCrossSignal
    from stratos.distill.data import Encoded

    teacher = tiny_llama(gemma_like, seed=3)
    online = OnlineTeacher(teacher)
    vm = VocabMap.build(bytelevel, gemma_like, student_rows=len(bytelevel), teacher_rows=len(gemma_like))
    recs = [{"prompt": "what is 11 + 1?", "response": "the answer is 12"},
            {"prompt": "say hello", "response": "héllo wörld"}]
    paired = pair_records(recs, bytelevel, gemma_like, 64, max_chain=3)
    up_front = CrossTokenizerSignal(online, paired, vm, teacher_pad_id=gemma_like.pad_token_id)
    sampled = SampledCrossSignal(online, recs, bytelevel, gemma_like, vm, teacher_pad_id=gemma_like.pad_token_id,
                                 max_chain=3)
    batch = collate(paired.student, [0, 1], bytelevel.pad_token_id)
    # The same rows, each computed by its own forward: MKL's sums can run in another order with the buffers'
    # alignment and the batch (torch.equal failed about one run in fifteen, by up to 3e-6), so to float rounding.
    torch.testing.assert_close(sampled.hidden(batch), up_front.hidden(batch), rtol=1e-4, atol=1e-5)
    assert torch.equal(sampled.kd_mask(batch), up_front.kd_mask(batch)) and bool(sampled.kd_mask(batch).any())
    # A sample the length limit stopped inside 'ö' (its first byte alone, no EOS): its text is cut at the
    # last whole character, the targets before it pair as ever and the lone byte has no partner.
    from stratos.teachers.topk import vocab_by_bytes

    table = vocab_by_bytes(bytelevel)
    response = [table["héllo".encode()], table[b" "], table[b"w"], table[b"\xc3"]]
    first = next(i for i, t in enumerate(paired.student[1].labels) if t != -100)
    prompt = paired.student[1].input_ids[:first]
    b2 = collate([Encoded(prompt + response, [-100] * len(prompt) + response)], [1], bytelevel.pad_token_id)
    mask = sampled.kd_mask(b2)
    assert sampled.hidden(b2).shape[0] == len(response) == mask.numel()
    # 'héllo' starts a span but is four teacher tokens, beyond a chain of three (CE alone, as up front); ' '
    # starts the next one; the lone byte of 'ö' has no partner.
    assert not bool(mask[0]) and bool(mask[1]) and not bool(mask[-1])
    assert sampled.stats["beyond_chain"] == 3  # 'héllo' here; 'héllo' and 'wörld' in the first batch
    assert sampled.stats["unpaired_rows"] == 0


def _cross_kd(student, teacher, s_tok, t_tok, records) -> float:
    """The student's cross-tokenizer KD term to the teacher (fkl at the span starts), per aligned target,
    on ``records``' responses."""
    paired = pair_records(records, s_tok, t_tok, 64)
    vm = VocabMap.build(s_tok, t_tok, student_rows=len(s_tok), teacher_rows=len(t_tok))
    sig = CrossTokenizerSignal(OnlineTeacher(teacher), paired, vm, teacher_pad_id=t_tok.pad_token_id)
    batch = collate(paired.student, list(range(len(paired.student))), s_tok.pad_token_id)
    with torch.no_grad():
        h = student.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        mask = sig.kd_mask(batch)
        out = kd_terms(h[:, :-1][batch.target_mask], sig.hidden(batch), batch.targets, OutputHead.from_model(student),
                       sig.head, Objective(loss="fkl"), kd_mask=mask)
    return float(out["kd"]) / int(mask.sum())


def test_gkd_across_tokenizers_scores_the_students_own_samples(tmp_path, bytelevel, spiece):
    """On-policy KD (gkd, lmbda 1: every batch is the student's own samples) with a teacher on another
    tokenizer: the teacher scores each sample in its own tokens, and the student's divergence to it on
    held-out answers falls."""
    records = [{"prompt": f"what is {a} + 1?", "response": f"the answer is {a + 1}"} for a in range(24)]
    teacher = tiny_llama(spiece, seed=3)  # a teacher that knows the answers' form: SFT on them first
    distill(teacher, spiece, records, DistillSpec(algorithm="sft", loss="ce", max_steps=40, learning_rate=3e-3,
                                                  per_device_train_batch_size=8, report_to=[], bf16=False,
                                                  save_steps=1000), tmp_path / "teacher", progress=False)
    student = tiny_llama(bytelevel, seed=1)
    before = _cross_kd(student, teacher, bytelevel, spiece, records[16:])
    cfg = DistillSpec(algorithm="gkd", lmbda=1.0, max_steps=30, max_completion_length=8, learning_rate=3e-3,
                      warmup_ratio=0.0, per_device_train_batch_size=8, report_to=[], bf16=False, save_steps=1000,
                      logging_steps=1, seed=0)
    res = distill(student, bytelevel, records[:16], cfg, tmp_path / "r", teacher=teacher, teacher_tokenizer=spiece,
                  progress=False)
    assert res.signal["mode"] == "online" and res.signal["ctkd"]["paired"].startswith("per batch")
    sampled = res.signal["ctkd"]["sampled"]  # 30 steps x 8 rows of samples, each paired as it came
    assert sampled["rows"] == 240 and 0 < sampled["aligned_targets"] <= sampled["student_targets"]
    assert res.signal["ctkd"]["aligned_share"] == sampled["aligned_targets"] / sampled["student_targets"]
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["on_policy_fraction"] == 1.0 for r in rows if "on_policy_fraction" in r)
    assert any(r["kd"] > 0 for r in rows if "kd" in r)  # the teacher scored what the student wrote
    after = _cross_kd(student, teacher, bytelevel, spiece, records[16:])
    assert after < 0.8 * before, (before, after)


def test_opd_across_tokenizers_scores_every_group_sample(tmp_path, bytelevel, spiece):
    """opd (grpo's groups and the verifier's reward, plus the divergence to the teacher on the same samples)
    with a teacher on another tokenizer: every step's samples are paired as they come and scored."""
    from stratos.tasks import to_records
    from stratos.tasks.arithmetic import ArithmeticTask

    task = ArithmeticTask(digits=1)
    records = to_records(task, task.examples("train", 8))
    cfg = DistillSpec(algorithm="opd", loss="rkl", kd_ratio=1.0, num_generations=2, max_completion_length=4,
                      max_steps=3, per_device_train_batch_size=8, learning_rate=3e-3, save_steps=100, logging_steps=1,
                      report_to=[], bf16=False, warmup_ratio=0.0)
    res = distill(tiny_llama(bytelevel, seed=1), bytelevel, records, cfg, tmp_path / "opd",
                  teacher=tiny_llama(spiece, seed=3), teacher_tokenizer=spiece, task=task, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "opd" / "metrics.jsonl").read_text().splitlines()]
    assert res.signal["ctkd"]["paired"].startswith("per batch") and len(rows) == 3
    assert all("reward" in r and r["kd"] > 0 for r in rows)


def test_first_token_map_sends_a_whole_teacher_token_to_the_students_first_piece(bytelevel, spiece, tmp_path):
    """ctkd.map first_token: a teacher token with no student token of its bytes maps to the first token of the
    student's own cut of its text. The teacher writes ' 12' as '▁1' '2', the student as ' ' '12': the
    teacher's '▁1' goes to the student's ' ', which exact mapping leaves to ULD. Exact mappings stay."""
    from stratos.teachers.topk import vocab_by_bytes

    exact = VocabMap.build(bytelevel, spiece, student_rows=len(bytelevel), teacher_rows=len(spiece))
    first = VocabMap.build(bytelevel, spiece, student_rows=len(bytelevel), teacher_rows=len(spiece), mapping="first_token")
    t1 = spiece.convert_tokens_to_ids("▁1")
    assert exact.t2s[t1] == -1 and first.t2s[t1] == vocab_by_bytes(bytelevel)[b" "]
    kept = exact.t2s >= 0
    assert torch.equal(first.t2s[kept], exact.t2s[kept])
    assert exact.stats["map"] == "exact" and first.stats["map"] == "first_token"
    with pytest.raises(ValueError, match=r"ctkd.map: expected 'exact' or 'first_token', not 'first'"):
        VocabMap.build(bytelevel, spiece, student_rows=len(bytelevel), teacher_rows=len(spiece), mapping="first")
    s_bytes, t_bytes = token_bytes(bytelevel), token_bytes(spiece)
    added = torch.nonzero((first.t2s >= 0) & ~kept).flatten().tolist()
    assert len(added) > 10
    for i in added:
        ids = bytelevel(t_bytes[i].decode(), add_special_tokens=False)["input_ids"]
        assert first.t2s[i] == ids[0] and t_bytes[i].startswith(s_bytes[ids[0]])
    assert first.stats["vocab_overlap"] == exact.stats["vocab_overlap"] and first.stats["map"] == "first_token"
    # The planner measures with the map the run will use, and the run trains with it.
    recs = [{"prompt": f"{a}+1=", "response": f"the answer is {a + 1}"} for a in range(8)]
    teacher = tiny_llama(spiece, seed=5)
    by_exact = measure_mapping(teacher, bytelevel, spiece, recs, max_length=64)
    by_first = measure_mapping(teacher, bytelevel, spiece, recs, max_length=64, mapping="first_token")
    assert by_first["mapped_mass"] > by_exact["mapped_mass"] and by_first["map"] == "first_token"
    cfg = DistillSpec(ctkd={"map": "first_token"}, max_steps=2, per_device_train_batch_size=4, report_to=[],
                      bf16=False, save_steps=1000, max_length=64, teacher_signal="online")
    res = distill(tiny_llama(bytelevel), bytelevel, recs, cfg, tmp_path / "r", teacher=teacher, teacher_tokenizer=spiece,
                  progress=False)
    assert res.signal["ctkd"]["map"] == "first_token" and res.final_metrics["kd"] > 0


# ------------------------------------------------------------------------------------------ the plan


def test_measure_mapping_and_the_matchs_two_branches(bytelevel, gemma_like):
    """The planner measures how much of the teacher's mass maps; at or above ctkd.min_mapped_mass the
    pair distils logits across tokenizers, below it the teacher teaches through its text."""
    from stratos.distill.recipe import resolve
    from stratos.plan.costmodel import ModelShape
    from stratos.plan.matching import match

    teacher = tiny_llama(gemma_like, seed=5)
    recs = [{"prompt": f"{a}+1=", "response": f"the answer is {a + 1}"} for a in range(8)]
    measured = measure_mapping(teacher, bytelevel, gemma_like, recs, max_length=64)
    assert 0 < measured["unchained_mass"] <= measured["mapped_mass"] + 1e-6 and measured["mapped_mass"] < 1
    # By hand on one record: at each aligned target, the teacher's probability on tokens that map; plus,
    # where its span goes on past a first token a that maps nowhere, p(a) q(x | a) summed over the
    # student tokens spelt a + x (the chained mass, moved from "other" to those tokens).
    one = measure_mapping(teacher, bytelevel, gemma_like, recs[:1], max_length=64, max_chain=2)
    vm = VocabMap.build(bytelevel, gemma_like, student_rows=len(bytelevel), teacher_rows=len(gemma_like))
    paired = pair_records(recs[:1], bytelevel, gemma_like, 64, max_chain=2)
    online = OnlineTeacher(teacher)
    h = online.hidden(collate(paired.teacher, [0], gemma_like.pad_token_id))
    first = chained = 0.0
    at = [(j, int(k[0]), int(a[0])) for j, k, a in zip(paired.target_map[0], paired.chain_targets[0],
                                                       paired.chain_tokens[0]) if j >= 0]
    for j, k, a in at:
        p = torch.softmax(online.head(h[j][None]), -1)[0]
        first += float(p[vm.t2s >= 0].sum())
        if k >= 0:
            q = torch.softmax(online.head(h[k][None]), -1)[0]
            xs = [x for pid, x, _ in vm.chain.tolist() if pid == vm.prefixes.get(vm.teacher_bytes[a])]
            chained += float(p[a] * q[xs].sum()) if vm.t2s[a] < 0 else 0.0
    assert one["positions"] == len(at)
    assert abs(one["unchained_mass"] - first / len(at)) < 1e-5
    assert abs(one["mapped_mass"] - (first + chained) / len(at)) < 1e-5
    t = ModelShape(name="t", params=4e6, tokenizer="aaa")
    s = ModelShape(name="s", params=1e6, tokenizer="bbb")
    share = measured["mapped_mass"]
    high = match(t, s, mapping=measured, min_mapped_mass=share - 0.01)
    low = match(t, s, mapping=measured, min_mapped_mass=share + 0.01)
    assert high.mode == "cross" and low.mode == "text" and match(t, s).mode == "text"
    assert f"{share:.0%}" in high.reasons[0] and "min_mapped_mass" in low.reasons[0]
    # The reason says what the chosen ctkd.method does, not always the default's.
    assert "the rest by sorted probabilities (ULD)" in high.reasons[0]
    uld = match(t, s, mapping=measured, min_mapped_mass=share - 0.01, ctkd_method="uld")
    assert "by sorted probabilities alone" in uld.reasons[0] and "token for token" not in uld.reasons[0]
    # What the run does with each: KD across tokenizers, or SFT on the text.
    cross = resolve(DistillSpec(), match="cross")
    assert cross.phases[0].algorithm == "kd" and cross.signal == "hidden"
    assert any("cross-tokenizer KD" in r for r in cross.reasons)
    assert resolve(DistillSpec(), match="text").phases[0].algorithm == "sft"
    # On-policy KD across tokenizers: the teacher scores the student's samples, paired as they come.
    assert resolve(DistillSpec(algorithm="gkd"), match="cross").phases[0].algorithm == "gkd"


def test_measure_mapping_says_how_far_the_teacher_agrees_with_the_data(bytelevel):
    """With one tokenizer every token maps to itself, so target_mass is the teacher's mean probability of each
    labelled token of the records and target_top the share it ranks first: here computed by a plain forward
    over the records as the engine encodes them."""
    from stratos.distill.data import encode_record

    teacher = tiny_llama(bytelevel, seed=3)
    recs = [{"prompt": f"{a}+1=", "response": f"the answer is {a + 1}"} for a in range(6)]
    got = measure_mapping(teacher, bytelevel, bytelevel, recs, max_length=64)
    probs, tops = [], []
    for rec in recs:
        ex, _ = encode_record(rec, bytelevel, 64)
        with torch.no_grad():
            p = torch.softmax(teacher(torch.tensor([ex.input_ids])).logits[0].float(), -1)
        for i in range(1, len(ex.labels)):
            if ex.labels[i] != IGNORE:
                probs.append(float(p[i - 1, ex.labels[i]]))
                tops.append(int(p[i - 1].argmax()) == ex.labels[i])
    assert got["positions"] == len(probs) and got["mapped_mass"] > 0.999
    assert abs(got["target_mass"] - sum(probs) / len(probs)) < 1e-5
    assert got["target_top"] == sum(tops) / len(tops)


# ------------------------------------------------------------------------------ an API teacher's top-k


def test_api_topk_to_a_student_with_a_dummy_prefix_keeps_its_first_one_hot(spiece):
    """An API teacher's tokens spell 'the answer is 12' as the text is; a Llama 2 style student writes '▁the'
    first, with a space the teacher's 'the' has not: its first target keeps the one-hot (the byte-for-byte map
    would send 'the' to the student's 'the', which it does not write there), the next span starts take the
    teacher's top-k."""
    from stratos.teachers.topk import TopKSignal, vocab_by_bytes

    table = vocab_by_bytes(spiece)
    tokens = ["the", " answer", " is", " 1", "2"]
    rec = {"prompt": "what is 11 + 1?", "response": "the answer is 12",
           "topk": {"tokens": tokens, "top": [[[t, -0.2], [" world", -1.9]] for t in tokens]}}
    sig = TopKSignal.from_records([rec], spiece, 64)
    assert sig.stats["aligned_by_bytes"] == 1 and sig.stats["misaligned"] == 0
    s_ids = spiece("the answer is 12", add_special_tokens=False)["input_ids"]
    assert spiece.convert_ids_to_tokens(s_ids[:3]) == ["▁the", "▁answer", "▁is"]
    ids = sig.ids[0]
    assert ids[0, 0].item() == s_ids[0] and (ids[0, 1:] == -1).all()
    assert ids[1, :2].tolist() == [table[b" answer"], table[b" world"]] and ids[2, 0].item() == table[b" is"]


def test_api_topk_of_another_tokenizer_aligns_by_bytes(bytelevel, tmp_path):
    """An API teacher's tokens (text, as the API returns them) cut 'the answer is 12' as the|_answer|_is|_1|2,
    the student as the|_answer|_is|_|12: the spans are the, _answer, _is and '_12'. The student's first four
    targets take the teacher's top-k at the same span starts; '12' (inside a span) and the EOS (no teacher
    position after the text) keep the one-hot on the reference token. Tokens spelling other text: one-hot."""
    from stratos.distill import distill
    from stratos.teachers.topk import TopKSignal, vocab_by_bytes

    table = vocab_by_bytes(bytelevel)
    tokens = ["the", " answer", " is", " 1", "2"]
    top = [[[t, -0.2], ["bytes:" + " world".encode().hex(), -1.9]] for t in tokens]
    top[3] = [[" 1", -0.4], [" ", -1.2]]  # ' 1' is no student token: its mass joins the remainder
    rec = {"prompt": "what is 11 + 1?", "response": "the answer is 12", "topk": {"tokens": tokens, "top": top}}
    other = {**rec, "response": "the answer is 13"}
    sig = TopKSignal.from_records([rec, other], bytelevel, 64)
    assert (sig.stats["with_topk"], sig.stats["aligned_by_bytes"], sig.stats["misaligned"]) == (1, 1, 1)
    assert sig.stats["topk_positions"] == 4 and sig.stats["unmapped"] == 1
    ids, logp = sig.ids[0], sig.logp[0]
    s_ids = bytelevel("the answer is 12", add_special_tokens=False)["input_ids"]
    assert [table[b] for b in (b"the", b" answer", b" is", b" ", b"12")] == s_ids  # the student's cut, as above
    for p, first in enumerate([b"the", b" answer", b" is"]):
        assert ids[p, :2].tolist() == [table[first], table[b" world"]] and logp[p, :2].tolist() == pytest.approx([-0.2, -1.9])
    assert ids[3, :2].tolist() == [table[b" "], -1] and logp[3, 0].item() == pytest.approx(-1.2)
    for p, label in ((4, table[b"12"]), (5, bytelevel.eos_token_id)):  # inside a span; the EOS
        assert ids[p, 0].item() == label and logp[p, 0].item() == 0.0 and (ids[p, 1:] == -1).all()
    assert (sig.ids[1][:, 1:] == -1).all()  # the misaligned record: one-hot throughout
    # The engine trains on it: distill with teacher_signal topk records the alignment.
    cfg = DistillSpec(teacher_signal="topk", max_steps=2, per_device_train_batch_size=2, report_to=[], bf16=False,
                      save_steps=1000, max_length=64)
    res = distill(tiny_llama(bytelevel), bytelevel, [rec, other], cfg, tmp_path / "r", progress=False)
    assert res.signal["mode"] == "topk" and res.signal["aligned_by_bytes"] == 1 and res.final_metrics["kd"] > 0
