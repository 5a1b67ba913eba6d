"""The teacher as a service (stratos.teachers.pool): real worker processes, shared memory, a worker
killed with SIGKILL mid-training, and the weights that come out compared bitwise. The tests marked by
backend run the same checks on Ray actors (stratos.teachers.ray_pool), on one local Ray cluster that
starts once for this module; they skip where Ray is not installed."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from conftest import addition_records
from stratos.distill import distill
from stratos.distill.data import collate, encode
from stratos.distill.sources import FixedSource
from stratos.distill.trainer import InFlight
from stratos.models.tiny import tiny_llama
from stratos.spec import DistillSpec
from stratos.teachers import TeacherError
from stratos.teachers.pool import ProcessBackend, TeacherPool, split_rows
from stratos.teachers.signal import HiddenStateCache, OnlineTeacher


@pytest.fixture(scope="module")
def teacher(tiny_tokenizer):
    return tiny_llama(tiny_tokenizer, hidden_size=48, num_hidden_layers=2, seed=1)


@pytest.fixture(scope="module")
def examples(tiny_tokenizer):
    return encode(addition_records(64, seed=3), tiny_tokenizer, max_length=64)[0]


HAVE_RAY = importlib.util.find_spec("ray") is not None
BACKENDS = ["process", pytest.param("ray", marks=pytest.mark.skipif(not HAVE_RAY, reason="Ray is not installed "
                                                                   "(pip install 'stratos[ray]')"))]


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster for the module, which every Ray pool here joins; it stops after the module's
    last test. 4 logical CPUs (on 2 cores): the module's pool holds 2 (2 workers of 1 thread) while
    other tests start their own."""
    import ray

    from stratos.teachers.ray_pool import init_ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports from tests
    started = init_ray(num_cpus=4)
    yield
    if started:
        ray.shutdown()


def _pool(request, teacher, backend, **options):
    if backend == "ray":
        request.getfixturevalue("ray_cluster")
    return TeacherPool(teacher, backend=backend, **options)


@pytest.fixture(scope="module", params=BACKENDS)
def run_pool(request, teacher):
    """Two workers of one thread, made as a run makes them from its settings (``distill.teacher_backend``),
    and what the run records about them."""
    from stratos.teachers.signal import teacher_pool

    if request.param == "ray":
        request.getfixturevalue("ray_cluster")
    pool, info = teacher_pool(teacher, DistillSpec(teacher_workers=2, teacher_threads=1,
                                                   teacher_backend=request.param), None)
    with pool:
        yield pool, info


@pytest.fixture
def pool(run_pool):
    return run_pool[0]


def test_a_runs_settings_choose_the_backend(run_pool, examples, tiny_tokenizer):
    """distill.teacher_backend: the run's pool is worker processes, or Ray actors in the cluster this
    process has (a given teacher_ray_address is joined the same way), and what the run records says so."""
    pool, info = run_pool
    if info["backend"] == "ray":
        from stratos.teachers.ray_pool import RayBackend

        assert isinstance(pool.backend, RayBackend) and info["ray_address"] == "local cluster"
    else:
        assert isinstance(pool.backend, ProcessBackend) and "ray_address" not in info
    assert info["workers"] == 2 and info["threads_per_worker"] == 1 and info["devices"] == ["cpu", "cpu"]


def _batch(examples, idx, pad_id):
    return collate([examples[i] for i in idx], idx, pad_id)


def test_split_rows_is_contiguous_balanced_and_never_empty():
    mask = torch.zeros(6, 10, dtype=torch.long)
    for row, n in enumerate([10, 2, 2, 2, 2, 2]):
        mask[row, :n] = 1
    parts = split_rows(mask, 2)
    assert parts == [slice(0, 1), slice(1, 6)]  # 10 tokens | 10 tokens
    assert split_rows(mask, 4) == split_rows(mask, 4)  # a function of the batch alone
    assert [p.stop - p.start for p in split_rows(mask[:1], 3)] == [1]  # fewer rows than workers
    for n in range(1, 7):
        parts = split_rows(mask, n)
        assert len(parts) == n and all(p.stop > p.start for p in parts)
        assert [p.start for p in parts[1:]] == [p.stop for p in parts[:-1]] and parts[-1].stop == 6


def test_pool_hidden_states_equal_in_process_ones(pool, teacher, examples, tiny_tokenizer):
    online = OnlineTeacher(teacher)
    pad = tiny_tokenizer.pad_token_id
    whole = _batch(examples, [5], pad)  # one row: one worker, the batch's own shape
    assert torch.equal(pool.hidden(whole), online.hidden(whole))
    batches = [_batch(examples, idx, pad) for idx in ([0, 1, 2, 3, 4, 5, 6, 7], [9, 30, 11], [40, 41])]
    for b in batches:  # several in flight at once, split across both workers
        pool.submit(b)
    assert pool.in_flight == 3
    for b in reversed(batches):  # taken in any order
        h, ref = pool.hidden(b), online.hidden(b)
        assert h.shape == (b.num_targets, 48) and h.dtype == torch.float32
        assert (h - ref).abs().max() <= 1e-6
    assert pool.in_flight == 0


def test_killed_worker_is_restarted_and_its_batches_resent(pool, teacher, examples, tiny_tokenizer):
    online = OnlineTeacher(teacher)
    batches = [_batch(examples, list(range(i, i + 8)), tiny_tokenizer.pad_token_id) for i in (0, 8, 16)]
    before = pool.restarts
    for b in batches:
        pool.submit(b)
    pool.backend.kill(1)  # SIGKILL (or ray.kill), holding a part of each batch
    for b in batches:
        assert (pool.hidden(b) - online.hidden(b)).abs().max() <= 1e-6
    assert pool.restarts == before + 1


def test_worker_error_stops_with_its_traceback(pool, examples, tiny_tokenizer):
    bad = _batch(examples, [0, 1], tiny_tokenizer.pad_token_id)
    bad.input_ids[0, 0] = 10**6  # no such token: the worker's embedding lookup fails
    with pytest.raises(TeacherError, match="teacher worker 0 failed:(.|\n)*IndexError"):
        pool.hidden(bad)


@pytest.mark.skipif(not HAVE_RAY, reason="Ray is not installed (pip install 'stratos[ray]')")
def test_ray_ships_the_teachers_weights_as_arrays_and_rebuilds_it(teacher, examples, tiny_tokenizer):
    import pickle

    from stratos.teachers.ray_pool import ModelState

    for model in (teacher, tiny_llama(tiny_tokenizer, hidden_size=48, num_hidden_layers=2, seed=1).to(torch.bfloat16)):
        state = ModelState(model)
        assert not any(t.device.type != "meta" for t in state.skeleton.state_dict().values())  # no weights pickled
        built = pickle.loads(pickle.dumps(state))()
        assert built.lm_head.weight is built.model.embed_tokens.weight  # tied weights stay tied
        assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                                             built.state_dict().values()))
    b = _batch(examples, [0, 1, 2], tiny_tokenizer.pad_token_id)
    assert torch.equal(OnlineTeacher(built).hidden(b), OnlineTeacher(model).hidden(b))


class _DiesInWorker:
    """A teacher that every worker fails to load (as if killed for memory at start-up): any process but
    the one that made it."""

    def __init__(self, model):
        self.model, self.pid = model, os.getpid()

    def __getstate__(self):  # a worker gets no model (it dies first): it need not import transformers to die
        return {"pid": self.pid}

    def __call__(self):
        if os.getpid() != self.pid:
            os._exit(3)
        return self.model


@pytest.mark.parametrize("backend", BACKENDS)
def test_worker_that_keeps_dying_stops_the_run(request, backend, teacher, examples, tiny_tokenizer):
    with _pool(request, _DiesInWorker(teacher), backend, workers=1, max_restarts=1) as p:
        with pytest.raises(TeacherError, match="died 2 times in a row"):
            p.hidden(_batch(examples, [0], tiny_tokenizer.pad_token_id))


def test_in_flight_sends_later_steps_before_they_train(examples, tiny_tokenizer):
    class Recorder:  # what the trainer sends, in order
        def __init__(self):
            self.sent = []

        def submit(self, batch):
            self.sent.append(tuple(batch.indices))

    cfg = DistillSpec(max_steps=5, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    source, rec = FixedSource(examples, cfg, tiny_tokenizer.pad_token_id), Recorder()
    flight = InFlight(source, rec, depth=2)
    got = flight.batches(0, 5)
    step = lambda s: [tuple(b) for b in source.schedule.micro_batches(s)]  # noqa: E731
    assert [tuple(b.indices) for b in got] == step(0)
    assert rec.sent == step(0) + step(1)  # this step's two micro-batches, then two more: step 1's
    flight.batches(1, 5)
    assert rec.sent == step(0) + step(1) + step(2)  # nothing sent twice
    assert InFlight(source, object(), depth=2).batches(0, 5) is not None  # a signal without submit: plain batches


def _train(teacher, tiny_tokenizer, out, **options):
    student = tiny_llama(tiny_tokenizer, hidden_size=32, num_hidden_layers=1, seed=2)
    signal = options.pop("signal", None)
    cfg = DistillSpec(loss="fkl", teacher_signal=options.pop("teacher_signal", "online"), max_steps=6,
                      per_device_train_batch_size=8, learning_rate=1e-3, save_steps=100, logging_steps=1,
                      report_to=[], bf16=False, **options)
    res = distill(student, tiny_tokenizer, addition_records(48, seed=4), cfg, out, teacher=teacher, progress=False,
                  signal=signal)
    return student, res


def test_training_with_workers_and_a_killed_worker_matches_in_process(teacher, tiny_tokenizer, tmp_path):
    threads = torch.get_num_threads()
    ref, _ = _train(teacher, tiny_tokenizer, tmp_path / "in-process")
    # One worker: every batch whole, the same shapes as in process, so the same weights bitwise.
    one, res = _train(teacher, tiny_tokenizer, tmp_path / "one", teacher_workers=1, teacher_threads=1)
    assert res.signal["workers"] == 1 and res.signal["threads_per_worker"] == 1
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), one.state_dict().values()))
    assert torch.get_num_threads() == threads  # the worker's thread went back to this process with it

    # Two workers, one of them SIGKILLed while it holds parts of three batches: restarted, those sent
    # again; the weights equal an uninterrupted two-worker run's bitwise (no batch lost or trained twice).
    def two(out, kill_at=None):
        pool = TeacherPool(teacher, workers=2, threads=1)
        submit, sent = pool.submit, []

        def submit_then_kill(batch):
            submit(batch)
            sent.append(batch)
            if len(sent) == kill_at:
                pool.backend.kill(1)

        pool.submit = submit_then_kill
        try:
            student, _ = _train(teacher, tiny_tokenizer, out, teacher_workers=2, signal=pool)
        finally:
            pool.close()
        return student, pool.restarts

    killed, restarts = two(tmp_path / "killed", kill_at=4)
    whole, no_restarts = two(tmp_path / "whole")
    assert (restarts, no_restarts) == (1, 0)
    assert all(torch.equal(a, b) for a, b in zip(killed.state_dict().values(), whole.state_dict().values()))
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(ref.state_dict().values(),
                                                                        whole.state_dict().values()))


def test_cache_built_by_workers_equals_the_in_process_build(teacher, tiny_tokenizer, tmp_path):
    examples, _ = encode(addition_records(40, seed=5), tiny_tokenizer, max_length=64)
    pad = tiny_tokenizer.pad_token_id
    ref = HiddenStateCache.build(teacher, examples, tmp_path, "ref", pad_id=pad, dtype="float32", batch_size=8,
                                 progress=False)
    with TeacherPool(teacher, workers=2, threads=1) as p:
        built = HiddenStateCache.build(teacher, examples, tmp_path, "pool", pad_id=pad, dtype="float32", batch_size=8,
                                       progress=False, signal=p)
    batch = _batch(examples, list(range(40)), pad)
    assert (built.hidden(batch) - ref.hidden(batch)).abs().max() <= 1e-6


def test_cli_trains_with_teacher_workers(tmp_path, tiny_tokenizer, teacher):
    """`stratos distill --teacher-workers 1` from the command line: the workers compute the online signal
    and the run records them."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from stratos.models.tiny import save_model

    t = save_model(teacher, tiny_tokenizer, tmp_path / "teacher")
    s = save_model(tiny_llama(tiny_tokenizer, hidden_size=32, num_hidden_layers=1, seed=2), tiny_tokenizer,
                   tmp_path / "student")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in addition_records(32, seed=6)))
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "stratos.cli", "distill", "--teacher", str(t), "--student", str(s), "--data",
           str(data), "--out", str(tmp_path / "run"), "--signal", "online", "--teacher-workers", "1",
           "--max-steps", "3", "--batch-size", "8"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(root / "src")})
    assert done.returncode == 0, done.stderr[-2000:]
    signal = json.loads((tmp_path / "run" / "result.json").read_text())["signal"]
    assert signal["mode"] == "online" and signal["workers"] == 1 and signal["devices"] == ["cpu"]
    bad = subprocess.run(cmd[:-4] + ["--teacher-workers", "-1"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(root / "src")})
    assert bad.returncode == 2 and "distill.teacher_workers" in bad.stderr


def test_gkd_with_stale_rollouts_overlaps_and_resumes_to_the_same_weights(teacher, tiny_tokenizer, tmp_path):
    """max_staleness 1: each step's rollouts are sampled while the step before trains, sent to the workers at
    once, and stored; a run stopped half-way and resumed reads them and ends with the same weights."""
    import json

    def run(out, stop_after=None, **options):
        student = tiny_llama(tiny_tokenizer, hidden_size=32, num_hidden_layers=1, seed=2)
        cfg = DistillSpec(algorithm="gkd", lmbda=1.0, loss="rkl", max_completion_length=6, max_steps=6,
                          per_device_train_batch_size=4, learning_rate=1e-2, save_steps=100, logging_steps=1,
                          report_to=[], bf16=False, seed=3, teacher_workers=1, **options)
        records = addition_records(24, seed=8)
        distill(student, tiny_tokenizer, records, cfg, out, teacher=teacher, progress=False, stop_after=stop_after)
        if stop_after:  # a second call resumes from the checkpoint at stop_after
            student = tiny_llama(tiny_tokenizer, hidden_size=32, num_hidden_layers=1, seed=2)
            distill(student, tiny_tokenizer, records, cfg, out, teacher=teacher, progress=False)
        return student

    stale = run(tmp_path / "stale", max_staleness=1)
    resumed = run(tmp_path / "resumed", stop_after=3, max_staleness=1)
    fresh = run(tmp_path / "fresh")
    assert all(torch.equal(a, b) for a, b in zip(stale.state_dict().values(), resumed.state_dict().values()))
    # Rollouts one update old are other samples than each step's own: the option does something.
    assert not all(torch.equal(a, b) for a, b in zip(stale.state_dict().values(), fresh.state_dict().values()))
    assert sorted(p.name for p in (tmp_path / "stale" / "rollouts").iterdir()) == \
        [f"step-{i:06d}.safetensors" for i in range(6)]
    rows = [json.loads(x) for x in (tmp_path / "stale" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7)) and all(r["on_policy_fraction"] == 1.0 for r in rows)


def test_worker_settings_are_checked_with_the_spec():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="teacher_devices names 2 device\\(s\\) for teacher_workers 1"):
        DistillSpec(teacher_workers=1, teacher_devices=["cpu", "cpu"])
    with pytest.raises(ValidationError, match="max_staleness 1 .* needs algorithm gkd or opd"):
        DistillSpec(algorithm="kd", teacher_workers=1, max_staleness=1)
    assert DistillSpec(algorithm="gkd", teacher_workers=2, teacher_devices=["cpu", "cpu"], max_staleness=1)
    with pytest.raises(ValidationError, match="teacher_ray_address is for teacher_backend ray"):
        DistillSpec(teacher_workers=1, teacher_ray_address="auto")


def test_gpu_workers_are_spawned_and_cpu_workers_forked_from_the_forkserver():
    from stratos.teachers.pool import start_method

    assert start_method(["cpu", "cpu"]) == "forkserver"
    assert start_method(["cpu", "cuda:1"]) == "spawn"  # a forked process cannot use CUDA once it is initialised
    assert start_method(["cuda"]) == "spawn"
