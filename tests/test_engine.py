"""The KD engine's parts: exact teacher logits from hidden states, chunking, the cache."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from stratos.distill import Objective, OutputHead, encode, kd_terms
from stratos.teachers.signal import HiddenStateCache, OnlineTeacher
from stratos.distill.data import collate
from stratos.distill.head import last_hidden
from stratos.models.tiny import tiny_llama
from tests.conftest import addition_records


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _batch(tok, n=6):
    examples, _ = encode(addition_records(n, seed=3), tok, max_length=64)
    return examples, collate(examples, list(range(len(examples))), tok.pad_token_id)


def _arch_models(tok):
    """Causal LMs whose heads differ: tied, untied, soft-capped (Gemma 2), scaled (Cohere)."""
    from transformers import CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    v = len(tok)
    yield "llama-tied", tiny_llama(tok, hidden_size=32, num_hidden_layers=1)
    yield "llama-untied", tiny_llama(tok, hidden_size=32, num_hidden_layers=1, tie_word_embeddings=False)
    yield "gemma2-softcap", Gemma2ForCausalLM(Gemma2Config(
        vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, final_logit_softcapping=5.0, pad_token_id=tok.pad_token_id))
    yield "cohere-scale", CohereForCausalLM(CohereConfig(
        vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, logit_scale=0.25, pad_token_id=tok.pad_token_id))


def test_recomputed_teacher_logits_equal_the_models_own(tiny_tokenizer):
    _, batch = _batch(tiny_tokenizer)
    seen = set()
    for name, model in _arch_models(tiny_tokenizer):
        model.eval()
        with torch.no_grad():
            full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
            want = full[:, :-1][batch.target_mask]
            got = OnlineTeacher(model).head(OnlineTeacher(model).hidden(batch))
        assert got.shape == want.shape
        assert _rel_err(got, want) <= 1e-4, name
        seen.add(name)
    assert len(seen) == 4


def test_head_scaling_is_applied_not_ignored(tiny_tokenizer):
    models = dict(_arch_models(tiny_tokenizer))
    head = OutputHead.from_model(models["gemma2-softcap"])
    assert head.softcap == 5.0
    h = torch.randn(4, 32) * 50
    assert head(h).abs().max() <= 5.0 + 1e-5  # soft-capped logits never exceed the cap
    assert OutputHead.from_model(models["cohere-scale"]).scale == 0.25


def test_head_save_load_roundtrip(tmp_path, tiny_tokenizer):
    models = dict(_arch_models(tiny_tokenizer))
    head = OutputHead.from_model(models["gemma2-softcap"])
    head.save(tmp_path / "h.safetensors")
    back = OutputHead.load(tmp_path / "h.safetensors")
    h = torch.randn(3, 32)
    assert torch.equal(head(h), back(h))


def test_a_frozen_head_held_in_bf16_gives_autocasts_logits(tiny_tokenizer):
    """hold_in(bf16): the teacher's head drops its fp32 weights, and under bf16 autocast its logits are
    bit-identical to those of the fp32 head (whose weights autocast casts); the student's live head stays."""
    models = dict(_arch_models(tiny_tokenizer))
    fp32, held = OutputHead.from_model(models["gemma2-softcap"]), OutputHead.from_model(models["gemma2-softcap"])
    h = torch.randn(6, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = fp32(h)
        after = held.hold_in(torch.bfloat16)(h)
    assert held.weight.dtype == torch.bfloat16 and after.dtype == torch.float32
    assert torch.equal(before, after)
    live = OutputHead.from_model(models["gemma2-softcap"], frozen_copy=False).hold_in(torch.bfloat16)
    assert live.weight.dtype == torch.float32


def test_distill_holds_only_the_teacher_head_it_made_in_bf16(tmp_path, tiny_tokenizer, monkeypatch):
    """distill() in bf16 holds the head of the signal it made itself in bf16; a signal passed in keeps its
    fp32 head (the caller may train in fp32 with it later)."""
    from stratos.distill import distill
    from stratos.spec import DistillSpec

    held = []
    real = OutputHead.hold_in
    monkeypatch.setattr(OutputHead, "hold_in", lambda self, dtype: held.append((self, dtype)) or real(self, dtype))
    teacher = tiny_llama(tiny_tokenizer, hidden_size=48, num_hidden_layers=1, seed=1)
    cfg = DistillSpec(loss="fkl", kd_ratio=0.5, max_steps=1, per_device_train_batch_size=4, bf16=True,
                      teacher_signal="online", report_to=[], save_steps=1)
    records = addition_records(8)
    distill(tiny_llama(tiny_tokenizer, hidden_size=32, num_hidden_layers=1, seed=2), tiny_tokenizer, records, cfg,
            tmp_path / "made", teacher=teacher, progress=False)
    assert len(held) == 1 and held[0][1] == torch.bfloat16 and held[0][0].weight.dtype == torch.bfloat16
    assert teacher.get_output_embeddings().weight.dtype == torch.float32  # a copy was held, not the teacher's own
    mine = OnlineTeacher(teacher)
    distill(tiny_llama(tiny_tokenizer, hidden_size=32, num_hidden_layers=1, seed=2), tiny_tokenizer, records, cfg,
            tmp_path / "passed", signal=mine, progress=False)
    assert len(held) == 1 and mine.head.weight.dtype == torch.float32


def test_a_wide_head_on_cpu_runs_few_row_counts_with_the_same_logits_and_gradients(monkeypatch):
    """On CPU, oneDNN keeps a primitive (with head-sized buffers) per matmul shape for the process's life, so a
    wide head pads its rows to a power of two: the logits and gradients are those of the unpadded head, and
    row counts 1 to 1024 run on 7 shapes. A narrow head (a task tokenizer's) runs its rows as they are."""
    from stratos.distill.head import PAD_VOCAB, chunk_rows

    linear = torch.nn.functional.linear
    seen: list[int] = []
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, w, b=None: seen.append(x.shape[0]) or linear(x, w, b))
    torch.manual_seed(0)
    for vocab, padded in ((PAD_VOCAB, True), (300, False)):
        weight = torch.nn.Parameter(torch.randn(vocab, 16) * 0.1)
        head = OutputHead(scale=0.5, live=torch.nn.Linear(16, vocab, bias=False))
        head.live.weight = weight
        seen.clear()
        for rows in (1, 3, 17, 100, 129, 1000):
            h = torch.randn(rows, 16, requires_grad=True)
            probe = torch.randn(rows, vocab)
            logits = head(h)
            assert logits.shape == (rows, vocab)
            got = torch.autograd.grad((logits * probe).sum(), [h, weight])
            ref_logits = linear(h, weight) * 0.5
            want = torch.autograd.grad((ref_logits * probe).sum(), [h, weight])
            assert torch.allclose(logits, ref_logits, atol=1e-5)
            assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(got, want))
        assert seen == ([16, 16, 32, 128, 256, 1024] if padded else [1, 3, 17, 100, 129, 1000])
    # A chunk is a power of two on CPU, so full chunks run unpadded; one the user sets is kept.
    assert chunk_rows(None, 49152, "cpu") == 128 and chunk_rows(None, 151936, "cpu") == 32
    assert chunk_rows(None, 300, "cpu") == 1024 and chunk_rows(100, 49152, "cpu") == 100


@pytest.mark.parametrize("loss", ["fkl", "jsd", "akl"])
def test_chunked_equals_unchunked_loss_and_gradients(tiny_tokenizer, loss):
    _, batch = _batch(tiny_tokenizer, n=8)
    teacher = tiny_llama(tiny_tokenizer, hidden_size=48, num_hidden_layers=1, seed=1)
    signal = OnlineTeacher(teacher)
    t_hidden = signal.hidden(batch)
    results = []
    for chunk in (5, 10_000):
        student = tiny_llama(tiny_tokenizer, hidden_size=32, num_hidden_layers=1, seed=2)
        s_head = OutputHead.from_model(student, frozen_copy=False)
        obj = Objective(loss=loss, temperature=2.0, kd_ratio=0.7, chunk_size=chunk)
        h = last_hidden(student, batch.input_ids, batch.attention_mask)[:, :-1][batch.target_mask]
        assert h.shape[0] > 2 * 5  # really several chunks
        terms = kd_terms(h, t_hidden, batch.targets, s_head, signal.head, obj)
        terms["loss"].backward()
        results.append((terms, {n: p.grad.clone() for n, p in student.named_parameters()}))
    (a, ga), (b, gb) = results
    for k in ("loss", "kd", "ce", "agree"):
        assert torch.allclose(a[k], b[k], rtol=1e-5), k
    for n in ga:
        assert torch.allclose(ga[n], gb[n], rtol=1e-4, atol=1e-7), n


@pytest.mark.parametrize(("loss", "kd_ratio", "temperature", "scale", "pad"),
                         [("fkl", 1.0, 1.0, True, 0), ("fkl", 1.0, 1.0, True, 12), ("fkl", 0.6, 2.0, True, 12),
                          ("fkl", 0.6, 2.0, False, 0), ("ce", 0.0, 1.0, True, 12), ("rkl", 1.0, 1.0, True, 0),
                          ("rkl", 0.6, 2.0, True, 12), ("rkl", 0.6, 2.0, False, 0)])
def test_closed_form_gradient_equals_autograd(monkeypatch, loss, kd_ratio, temperature, scale, pad):
    """The built-in fkl/rkl/ce take a hand-derived gradient in the logits; the same loss registered as a
    user function goes through autograd. Loss, terms and gradients must agree (with and without the
    student's vocabulary padded past the teacher's; several chunks)."""
    from stratos.distill import losses

    torch.manual_seed(0)
    n, d, vocab = 300, 24, 500
    weight = torch.randn(vocab + pad, d) * 0.3
    t_head = OutputHead(torch.randn(vocab, d) * 0.3)
    h0, t_hidden, targets = torch.randn(n, d), torch.randn(n, d), torch.randint(0, vocab, (n,))
    obj = Objective(loss=loss, kd_ratio=kd_ratio, temperature=temperature, scale_by_temperature=scale, chunk_size=128)
    results = []
    for user_copy in (False, True):
        if user_copy:  # same maths, but not the built-in function object: autograd path
            builtin = losses.LOSSES[loss]
            monkeypatch.setitem(losses.LOSSES, loss, losses.Loss(lambda *a, **k: builtin.fn(*a, **k), builtin.needs_teacher))
        h, w = h0.clone().requires_grad_(True), torch.nn.Parameter(weight.clone())
        terms = kd_terms(h, t_hidden, targets, OutputHead(w), t_head, obj)
        terms["loss"].backward()
        results.append((terms, h.grad, w.grad))
    (a, ha, wa), (b, hb, wb) = results
    for k in ("loss", "kd", "ce", "agree"):
        assert torch.allclose(a[k], b[k], rtol=1e-5), k
    assert a["loss"] > 0 and (ha.abs().sum() > 0)
    assert torch.allclose(ha, hb, rtol=1e-4, atol=1e-6)
    assert torch.allclose(wa, wb, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss,kd_ratio", [("ce", 0.0), ("fkl", 0.5)])
def test_label_smoothing_is_torchs_on_the_ce_term_in_closed_form_and_by_autograd(loss, kd_ratio):
    """label_smoothing_factor smooths the CE term as F.cross_entropy(label_smoothing=) does, in the closed-form
    gradient and through autograd alike (several chunks)."""
    torch.manual_seed(2)
    n, d, vocab, f = 150, 16, 200, 0.1
    w0, t_w = torch.randn(vocab, d) * 0.3, torch.randn(vocab, d) * 0.3
    h0, t_hidden, targets = torch.randn(n, d), torch.randn(n, d), torch.randint(0, vocab, (n,))
    obj = Objective(loss=loss, kd_ratio=kd_ratio, label_smoothing=f, chunk_size=64)
    ref_h, ref_w = h0.clone().requires_grad_(True), torch.nn.Parameter(w0.clone())
    logits = ref_h @ ref_w.T
    expected = torch.nn.functional.cross_entropy(logits, targets, reduction="sum", label_smoothing=f)
    if kd_ratio:
        p_t = torch.softmax(t_hidden @ t_w.T, -1)
        kd = (p_t * (p_t.log() - torch.log_softmax(logits, -1))).sum()
        expected = kd_ratio * kd + (1 - kd_ratio) * expected
    expected.backward()
    for weights in (None, torch.ones(n)):  # per-token weights (all 1) take autograd instead of the closed form
        h, w = h0.clone().requires_grad_(True), torch.nn.Parameter(w0.clone())
        terms = kd_terms(h, t_hidden, targets, OutputHead(w), OutputHead(t_w), obj, weights=weights)
        terms["loss"].backward()
        assert torch.allclose(terms["loss"], expected, rtol=1e-5), weights
        assert torch.allclose(h.grad, ref_h.grad, rtol=1e-4, atol=1e-6), weights
        assert torch.allclose(w.grad, ref_w.grad, rtol=1e-4, atol=1e-6), weights
    unsmoothed = kd_terms(h0, t_hidden, targets, OutputHead(w0), OutputHead(t_w), replace(obj, label_smoothing=0.0))
    assert not torch.allclose(unsmoothed["loss"], expected.detach(), rtol=1e-3)  # the option changes the loss


def test_vocab_padding_differences_are_handled(tiny_tokenizer):
    """A teacher whose embedding matrix is padded past the tokenizer still distils into a student."""
    _, batch = _batch(tiny_tokenizer)
    teacher = tiny_llama(tiny_tokenizer, hidden_size=32, num_hidden_layers=1, seed=1)
    teacher.resize_token_embeddings(len(tiny_tokenizer) + 37)
    student = tiny_llama(tiny_tokenizer, hidden_size=32, num_hidden_layers=1, seed=2)
    sig = OnlineTeacher(teacher)
    h = last_hidden(student, batch.input_ids, batch.attention_mask)[:, :-1][batch.target_mask]
    terms = kd_terms(h, sig.hidden(batch), batch.targets, OutputHead.from_model(student), sig.head, Objective())
    assert torch.isfinite(terms["loss"]) and terms["kd"] > 0


def test_two_builders_of_one_cache_entry_at_once_both_get_it_whole(tmp_path, tiny_tokenizer, monkeypatch):
    """Two runs sharing STRATOS_CACHE may build the same entry at once: each writes its own temporary
    files and publishes them by a rename, so both finish and read the same complete shards; a writer
    that fails leaves what was there and no temporary file."""
    import threading
    import time

    from stratos.io import atomic_save_tensors

    examples, _ = encode(addition_records(40, seed=5), tiny_tokenizer, max_length=64)
    teacher = tiny_llama(tiny_tokenizer, hidden_size=48, num_hidden_layers=1, seed=1)
    HiddenStateCache.SHARD_EXAMPLES, old = 8, HiddenStateCache.SHARD_EXAMPLES
    built, errors = [], []

    def build() -> None:
        try:
            built.append(HiddenStateCache.build(teacher, examples, tmp_path, "k", pad_id=tiny_tokenizer.pad_token_id,
                                                dtype="float32", batch_size=2, progress=False))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    import safetensors.torch

    save_file = safetensors.torch.save_file

    def slow_save_file(*args, **kwargs):  # each file's write takes a while: the two builders' writes overlap
        save_file(*args, **kwargs)
        time.sleep(0.05)

    monkeypatch.setattr("safetensors.torch.save_file", slow_save_file)
    try:
        threads = [threading.Thread(target=build) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        HiddenStateCache.SHARD_EXAMPLES = old
    assert not errors and len(built) == 2
    idx = list(range(40))
    batch = collate([examples[i] for i in idx], idx, tiny_tokenizer.pad_token_id)
    expected = OnlineTeacher(teacher).hidden(batch)
    assert all(torch.allclose(c.hidden(batch), expected, atol=1e-5) for c in built)
    assert sorted(p.name for p in built[0].path.iterdir()) == ["head.safetensors", "meta.json"] + [
        f"shard-{i:05d}.safetensors" for i in range(5)]  # nothing half-written or temporary is left

    shard = built[0].path / "shard-00000.safetensors"
    before = shard.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        atomic_save_tensors({"x": torch.zeros(3)}, shard)
    assert shard.read_bytes() == before and len(list(built[0].path.iterdir())) == 7


def test_cache_matches_online_and_is_reused_and_resumable(tmp_path, tiny_tokenizer):
    examples, _ = encode(addition_records(40, seed=5), tiny_tokenizer, max_length=64)
    teacher = tiny_llama(tiny_tokenizer, hidden_size=48, num_hidden_layers=1, seed=1)
    HiddenStateCache.SHARD_EXAMPLES, old = 16, HiddenStateCache.SHARD_EXAMPLES
    try:
        cache = HiddenStateCache.build(teacher, examples, tmp_path, "k", pad_id=tiny_tokenizer.pad_token_id,
                                       dtype="float32", batch_size=5, progress=False)
        online = OnlineTeacher(teacher)
        idx = [37, 2, 17, 16]  # across shards, out of order
        batch = collate([examples[i] for i in idx], idx, tiny_tokenizer.pad_token_id)
        assert torch.allclose(cache.hidden(batch), online.hidden(batch), atol=1e-5)
        assert len(list(cache.path.glob("shard-*.safetensors"))) == 3
        # A crash after the first shard: the rebuild keeps it and writes only what is missing.
        (cache.path / "meta.json").unlink()
        (cache.path / "shard-00002.safetensors").unlink()
        first = (cache.path / "shard-00000.safetensors").stat().st_mtime_ns
        rebuilt = HiddenStateCache.build(teacher, examples, tmp_path, "k", pad_id=tiny_tokenizer.pad_token_id,
                                         dtype="float32", progress=False)
        assert (rebuilt.path / "shard-00000.safetensors").stat().st_mtime_ns == first
        assert torch.allclose(rebuilt.hidden(batch), online.hidden(batch), atol=1e-5)
        # bf16 storage halves the bytes and stays close.
        bf = HiddenStateCache.build(teacher, examples, tmp_path, "kb", pad_id=tiny_tokenizer.pad_token_id,
                                    dtype="bfloat16", progress=False)
        assert bf.bytes_on_disk < 0.6 * cache.bytes_on_disk
        assert torch.allclose(bf.hidden(batch), online.hidden(batch), rtol=2e-2, atol=2e-2)
    finally:
        HiddenStateCache.SHARD_EXAMPLES = old
