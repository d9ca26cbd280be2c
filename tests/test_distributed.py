"""Distributed meta-training: 2 gloo processes under torchrun == 1 process with the same meta-batch."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from metanet import checkpoint as ckpt
from metanet import distributed
from metanet.meta import MetaNet, ModelConfig, meta_loss
from metanet.space import load
from metanet.tasks import Episode, Sinusoid
from metanet.trainer import ConfigError, TrainConfig, build_model, build_space, build_tasks, check_tasks, train

# Seven tasks over two ranks: uneven blocks (4 + 3), so the weighting by share is tested too.
CFG = TrainConfig(space="mlp_regression", tasks="sinusoid", steps=4, meta_batch=7, val_every=2, val_tasks=4, log_every=1, strategy="loop", gumbel=True, seed=5)
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Every rank: a fresh distributed run stopped after 2 steps (as if killed), then resumed
# through the command line. The process group is the worker's, so train() leaves it alone.
WORKER = """
import json, sys
import torch
import torch.distributed as dist

torch.set_num_threads(1)
dist.init_process_group("gloo")
from metanet.cli import main
from metanet.trainer import TrainConfig, train

assert train(TrainConfig(**json.loads(sys.argv[1])), sys.argv[2], stop_after=2) == {"stopped": 2}
code = main(["-v", "train", "--resume", "--quiet", "--out", sys.argv[2]])
dist.barrier()  # no rank tears its connections down while another still uses them
dist.destroy_process_group()
sys.exit(code)
"""


def _torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``torchrun --nnodes 1 --nproc_per_node 2 ...`` on loopback (gloo)."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env["OMP_NUM_THREADS"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU (gloo) path, also on a machine with one GPU for two ranks
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


def _assert_same_run(one: Path, two: Path) -> None:
    """Same parameters, optimizer moments and logged training figures, to float tolerance."""
    a, b = ckpt.load_checkpoint(one / ckpt.LAST), ckpt.load_checkpoint(two / ckpt.LAST)
    assert a["state"]["step"] == b["state"]["step"] == CFG.steps
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-4, atol=1e-6, msg=k)
    init = build_model(CFG, build_space(CFG), 0).state_dict()
    assert max(float((a["model"][k] - init[k]).abs().max()) for k in init) > 1e-4  # training moved them
    for i, s in a["optimizer"]["state"].items():
        for k, atol in (("exp_avg", 1e-7), ("exp_avg_sq", 1e-10)):  # moments of gradients, some near 0
            torch.testing.assert_close(b["optimizer"]["state"][i][k], s[k], rtol=1e-3, atol=atol, msg=f"{i} {k}")
    rows_a = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], "val" in r) for r in rows_b] == [(r["step"], "val" in r) for r in rows_a]  # no duplicates: rank 1 wrote none
    for ra, rb in zip(rows_a, rows_b):
        for k in ("loss", "query_loss", "kl", "entropy", "metric"):
            if k in ra:
                assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-7), (ra["step"], k)
        # Validation figures are not compared: this early, op weights are near ties, and a
        # 1e-7 difference in parameters can flip one task's discretised architecture.


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    train(CFG, out)
    return out


def test_two_processes_equal_one_process_through_stop_and_resume(one_process, tmp_path):
    """torchrun 2 gloo ranks, each adapting its block of the meta-batch, == 1 process.

    The distributed run stops after 2 steps and resumes (``metanet train --resume``) on 2 ranks.
    """
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    cfg = {k: v for k, v in dataclasses.asdict(CFG).items()}
    proc = _torchrun(str(worker), json.dumps(cfg), "two", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = tmp_path / "two"
    _assert_same_run(one_process, two)
    # rank 0 alone writes files and prints; each rank adapted its own block of tasks
    assert sorted(p.name for p in two.iterdir()) == ["best.pt", "config.yaml", "last.pt", "metrics.jsonl", "space.yaml"]
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 1 and json.loads(lines[0])["step"] == CFG.steps, proc.stdout
    assert "rank 0/2 adapts tasks 0:4 of 7" in proc.stderr and "rank 1/2 adapts tasks 4:7 of 7" in proc.stderr


def test_a_mistake_is_one_error_on_every_rank_not_a_hang(tmp_path):
    """Rank 0 finds the mistake and tells the others: the job ends at once, exit status 2, no folder."""
    proc = _torchrun("-m", "metanet", "train", "--space", "conv_omniglot", "--tasks", "sinusoid", "--out", "bad", cwd=tmp_path)
    line = "metanet: error: space 'conv_omniglot' is for classification but tasks 'sinusoid' are regression\n"
    assert line in proc.stderr, proc.stderr[-3000:]
    # torchrun stops the other worker once one exits (SIGTERM, -15) if it has not exited already
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", proc.stderr)
    assert "2" in codes and set(codes) <= {"2", "-15"}, proc.stderr[-3000:]
    assert "metanet/trainer.py" not in proc.stderr and "metanet/cli.py" not in proc.stderr  # no traceback of ours
    assert proc.returncode != 0 and proc.stdout == ""
    assert not (tmp_path / "bad").exists()


def test_shards_partition_the_meta_batch():
    for n in (1, 7, 8, 25):
        for world in range(1, n + 1):
            parts = [distributed.shard(n, r, world) for r in range(world)]
            assert [i for p in parts for i in range(n)[p]] == list(range(n))
            sizes = [p.stop - p.start for p in parts]
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_shard_losses_sum_to_the_full_meta_gradient():
    """In one process: the weighted block losses' gradients sum to the full batch's, noise included."""
    torch.manual_seed(0)
    model = MetaNet(load("mlp_regression"), 0, ModelConfig(dim=8, latent=4)).double()
    ep = Sinusoid(shots=5, queries=5).sample(5, torch.Generator().manual_seed(0))
    ep = type(ep)(*(t.double() for t in (ep.support_x, ep.support_y, ep.query_x, ep.query_y)))
    kw = dict(inner_steps=2, order="second", temperature=1.0, gumbel=True, hard=False, strategy="loop")
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(part):
        loss, m = distributed.shard_loss(model, ep, part, torch.Generator().manual_seed(3), **kw)
        return torch.autograd.grad(loss, params, allow_unused=True), m, loss

    full, m_full, loss_full = grads(slice(0, 5))
    ref, _ = meta_loss(model, ep, generator=torch.Generator().manual_seed(3), **kw)
    assert loss_full.item() == ref.item()
    a, m_a, loss_a = grads(slice(0, 3))
    b, m_b, loss_b = grads(slice(3, 5))
    assert abs(loss_a.item() - loss_full.item()) > 1e-3  # a block is not the whole batch
    for g, ga, gb in zip(full, a, b):
        if g is not None:
            torch.testing.assert_close(ga + gb, g)
    for k in m_full:
        assert m_a[k] + m_b[k] == pytest.approx(m_full[k], rel=1e-9, abs=1e-12), k


@pytest.mark.parametrize("part", [slice(0, 2), slice(2, 5), slice(4, 5)])
def test_a_block_generated_alone_equals_the_block_of_the_whole_meta_batch(part):
    """``generate(part=...)`` (what each rank runs) against the slice of the whole meta-batch's
    generation, float64: encoder with family metadata, conditional architecture with op
    dropout and hard Gumbel noise, sampled VAE weights, prototype head; and the noise
    generator ends in the same state, so the next step's noise matches too."""
    torch.manual_seed(0)
    model = MetaNet(load("tiny"), 3, ModelConfig(dim=8, latent=4)).double()
    g = torch.Generator().manual_seed(0)
    y = torch.arange(3).expand(5, 3).contiguous()
    x = torch.randn(5, 3, 1, 8, 8, generator=g, dtype=torch.float64)
    metadata = torch.tensor([0, 2, -1, 1, 0])
    kw = dict(temperature=0.7, gumbel=True, hard=True, sample=True, op_dropout=0.3)
    whole_noise, block_noise = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    whole = model.generate(x, y, metadata, generator=whole_noise, **kw).slice(part).tensors()
    block = model.generate(x, y, metadata, generator=block_noise, part=part, **kw).tensors()
    assert set(block) == set(whole) and "latent" in block and "params.head.w" in block
    for name, t in whole.items():
        assert block[name].shape == t.shape, name
        torch.testing.assert_close(block[name], t, rtol=1e-12, atol=1e-12, msg=name)
    assert torch.equal(whole_noise.get_state(), block_noise.get_state())
    other = model.generate(x, y, metadata, generator=torch.Generator().manual_seed(4), part=part, **kw).tensors()
    assert not torch.allclose(other["latent"], block["latent"])  # the noise reaches the block


def _tiny_image_episode(b: int = 3):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(3).expand(b, 3).contiguous()
    return Episode(torch.randn(b, 3, 1, 8, 8, generator=g, dtype=torch.float64), y, torch.randn(b, 3, 1, 8, 8, generator=g, dtype=torch.float64), y)


@pytest.mark.parametrize(
    "space, config, kw",
    [
        ("mlp_regression", ModelConfig(dim=8, latent=4), dict(inner_steps=2, order="second", gumbel=True, param_prior=0.3, entropy_weight=0.1)),
        ("mlp_regression", ModelConfig(dim=8, latent=4, inner_optimizer="lstm", adapt_alpha=True), dict(inner_steps=2, order="first")),
        ("mlp_regression", ModelConfig(dim=8, latent=4, meta_sgd=True), dict(inner_steps=1, order="reptile")),
        ("tiny", ModelConfig(dim=8, latent=4), dict(inner_steps=1, order="second", hard=True, op_dropout=0.2, param_prior=0.5)),
        ("tiny", ModelConfig(dim=8, latent=4, arch="shared", weights="off", proto_head=False), dict(inner_steps=2, order="second", checkpoint=True)),
    ],
    ids=["vae-gumbel-prior", "lstm-adapt-alpha-first", "metasgd-reptile", "image-hard-dropout", "image-shared-checkpoint"],
)
@pytest.mark.parametrize("workers", [1, 2], ids=["task", "threads"])
def test_one_backward_per_task_gives_the_meta_gradient_of_the_whole_batch(space, config, kw, workers):
    """The ``task`` and ``threads`` strategies (float64): the gradients, loss and metrics of
    ``shard_loss``, on the whole meta-batch and on a block of it, with the noise drawn as
    one process does; with the tasks shared among two threads as well."""
    torch.manual_seed(0)
    model = MetaNet(load(space), 0, config).double()
    if space == "tiny":
        ep = _tiny_image_episode()
    else:
        ep = Sinusoid(shots=5, queries=5).sample(3, torch.Generator().manual_seed(0))
        ep = type(ep)(*(t.double() for t in (ep.support_x, ep.support_y, ep.query_x, ep.query_y)))
    kw = {"temperature": 0.7, "strategy": "loop", "gumbel": False, "hard": False, **kw}
    params = [p for p in model.parameters() if p.requires_grad]
    for part in (slice(0, 3), slice(1, 3)):
        loss, m = distributed.shard_loss(model, ep, part, torch.Generator().manual_seed(3), **kw)
        ref = torch.autograd.grad(loss, params, allow_unused=True)
        got_loss, got, got_m = distributed.per_task_gradients(model, ep, part, torch.Generator().manual_seed(3), params, workers=workers, **{**kw, "strategy": "task"})
        torch.testing.assert_close(got_loss, loss.detach(), rtol=1e-12, atol=1e-12)
        assert sum(g is not None for g in ref) > 0
        for name, r, g in zip([n for n, p in model.named_parameters() if p.requires_grad], ref, got):
            if r is None or g is None:  # unused either way: both none, or an all-zero gradient
                assert (r if r is not None else g) is None or not (r if r is not None else g).any(), name
                continue
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12, msg=name)
        for k in m:  # (accuracy is a float32 mean: its rounding differs by the grouping)
            assert got_m[k] == pytest.approx(m[k], rel=1e-6, abs=1e-12), k


def test_a_run_with_one_backward_per_task_takes_the_steps_of_the_loop(one_process, tmp_path):
    """``--strategy task`` through the trainer: the run of ``--strategy loop``."""
    train(dataclasses.replace(CFG, strategy="task"), tmp_path / "task")
    _assert_same_run(one_process, tmp_path / "task")


def test_a_run_with_the_tasks_shared_among_threads_takes_the_steps_of_the_loop(one_process, tmp_path, monkeypatch, two_threads):
    """``--strategy threads`` through the trainer: the run of ``--strategy loop`` (up to the
    float rounding of another summation order), its tasks on the worker threads, the
    thread count as it was after."""
    names: set[str] = set()
    real = distributed.outer_loss

    def spy(*a, **k):
        names.add(threading.current_thread().name)
        return real(*a, **k)

    monkeypatch.setattr(distributed, "outer_loss", spy)
    train(dataclasses.replace(CFG, strategy="threads"), tmp_path / "threads")
    assert torch.get_num_threads() == 2
    assert names and all(n.startswith("metanet-task") for n in names), names
    _assert_same_run(one_process, tmp_path / "threads")


def test_threads_run_their_tasks_on_one_intra_op_thread_each_and_pass_errors_on(monkeypatch, two_threads):
    """The ``threads`` workers: each task on a worker thread with torch's thread count at 1,
    the count restored afterwards, and an error in a task raised in the caller (the count
    restored all the same)."""
    torch.manual_seed(0)
    model = MetaNet(load("tiny"), 0, ModelConfig(dim=8, latent=4)).double()
    ep = _tiny_image_episode(b=4)
    params = [p for p in model.parameters() if p.requires_grad]
    seen: list[tuple[str, int]] = []
    real = distributed.outer_loss

    def spy(*a, **k):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        if k.pop("fail", False):
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(distributed, "outer_loss", spy)
    distributed.per_task_gradients(model, ep, slice(0, 4), torch.Generator().manual_seed(0), params, workers=2, inner_steps=1, order="second")
    assert len(seen) == 4 and {n for n, _ in seen} != {threading.current_thread().name} and all(n.startswith("metanet-task") for n, _ in seen)
    assert {c for _, c in seen} == {1} and torch.get_num_threads() == 2
    seen.clear()
    with pytest.raises(RuntimeError, match="boom"):
        distributed.per_task_gradients(model, ep, slice(0, 4), torch.Generator().manual_seed(0), params, workers=2, inner_steps=1, order="second", fail=True)
    assert torch.get_num_threads() == 2


def test_threads_stop_taking_tasks_once_one_of_them_raised(monkeypatch, two_threads):
    """A worker whose task raises stops the others at their next task: of 8 tasks on two
    workers, the one that did not raise runs at most the task it is in and one more, not
    its four."""
    torch.manual_seed(0)
    model = MetaNet(load("tiny"), 0, ModelConfig(dim=8, latent=4)).double()
    ep = _tiny_image_episode(b=8)
    params = [p for p in model.parameters() if p.requires_grad]
    calls: list[str] = []
    lock = threading.Lock()
    real = distributed.outer_loss

    def spy(*a, **k):
        with lock:
            calls.append(threading.current_thread().name)
            first = len(calls) == 1
        if first:
            raise RuntimeError("boom")
        time.sleep(0.3)  # the other worker's task: long enough for the failure to be seen
        return real(*a, **k)

    monkeypatch.setattr(distributed, "outer_loss", spy)
    with pytest.raises(RuntimeError, match="boom"):
        distributed.per_task_gradients(model, ep, slice(0, 8), torch.Generator().manual_seed(0), params, workers=2, inner_steps=1, order="second")
    others = calls[1:]  # the other worker's tasks (on either thread: a pool thread takes the next share when free)
    assert len(others) <= 2, calls  # without the stop: 4


def test_without_torchrun_there_is_one_process_and_no_group():
    ctx = distributed.setup("cpu")
    assert (ctx.rank, ctx.world_size, ctx.distributed, ctx.owns_group) == (0, 1, False, False)
    t = torch.ones(3)
    assert ctx.all_reduce_sum(t) is t and torch.equal(t, torch.ones(3))
    assert ctx.broadcast_object({"a": 1}) == {"a": 1}
    assert not torch.distributed.is_initialized()


def test_meta_batch_smaller_than_the_world_is_refused():
    cfg = TrainConfig(meta_batch=2)
    with pytest.raises(ConfigError, match=r"^meta-batch 2 is smaller than the 4 processes; every process needs at least one task$"):
        check_tasks(cfg, build_space(cfg), build_tasks(cfg), world_size=4)


def test_a_gpu_named_without_an_index_is_each_processs_own() -> None:
    """``train(..., device="cuda")`` under torchrun: rank r trains on ``cuda:LOCAL_RANK``
    (``torch.cuda.set_device`` refuses a device without an index); an index given stays."""
    assert distributed.train_device("cuda", 1) == torch.device("cuda", 1)
    assert distributed.train_device(torch.device("cuda"), 0) == torch.device("cuda", 0)
    assert distributed.train_device("cuda:0", 1) == torch.device("cuda", 0)
    assert distributed.train_device("cpu", 1) == torch.device("cpu")
    assert distributed.train_device(None, 1) == (torch.device("cuda", 1) if torch.cuda.is_available() else torch.device("cpu"))

