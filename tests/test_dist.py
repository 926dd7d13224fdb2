"""Two gloo processes on CPU: the loss and gradients of one step equal one process with the same global batch."""
import os
import socket

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from medcl import dist, losses


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)


def _loss(name, model, x1, x2, gather, rank):
    z1, z2 = model(x1), model(x2)
    if name == "simclr":
        return losses.nt_xent(z1, z2, 0.3, gather=gather, rank=rank)
    if name == "supcon":
        labels = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1])
        n = len(x1)
        return losses.nt_xent(z1, z2, 0.3, labels=labels[rank * n:(rank + 1) * n], gather=gather, rank=rank)
    return losses.infonce_batch(z1, z2, 0.3, gather=gather, rank=rank)


def _worker(rank, world, port, name, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    model = torch.nn.parallel.DistributedDataParallel(_model())
    x1, x2 = _data()
    n = len(x1) // world
    sl = slice(rank * n, (rank + 1) * n)
    loss = _loss(name, model, x1[sl], x2[sl], dist.gather_with_grad, rank)
    loss.backward()
    full_loss = dist.mean_over_ranks(loss).item()  # the global loss is the mean of the per-rank means
    if rank == 0:
        out.put((full_loss, [p.grad.tolist() for p in model.parameters()]))
    tdist.barrier()
    tdist.destroy_process_group()


@pytest.mark.parametrize("name", ["simclr", "supcon", "moco_v3"])
def test_two_process_step_equals_single_process(name):
    model = _model()
    x1, x2 = _data()
    if name == "supcon":
        ref = losses.nt_xent(model(x1), model(x2), 0.3, labels=torch.tensor([0, 1, 0, 1, 1, 0, 0, 1]))
    else:
        ref = _loss(name, model, x1, x2, None, 0)
    ref.backward()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, name, q)) for r in range(2)]
    for p in procs:
        p.start()
    loss, grads = q.get(timeout=120)
    for p in procs:
        p.join(60)
    assert loss == pytest.approx(ref.item(), rel=1e-5)
    for g, p in zip(grads, model.parameters()):
        assert torch.allclose(torch.tensor(g), p.grad, atol=1e-6), "gradient off (e.g. by the world size)"


def _pretrain_worker(rank, world, port, data, out, nan_rank, q):
    import math

    from medcl import methods
    from medcl.config import MedclConfig, apply_overrides
    from medcl.errors import TrainingDiverged
    from medcl.train import pretrain

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    real, calls = methods.SimCLR.loss_fn, [0]

    def flaky(self, z1, z2, labels):  # this rank's loss turns NaN from its 5th step on; the other rank's stays finite
        calls[0] += 1
        loss = real(self, z1, z2, labels)
        return loss * math.nan if calls[0] >= 5 else loss

    if rank == nan_rank:
        methods.SimCLR.loss_fn = flaky
    cfg = apply_overrides(MedclConfig(), {"encoder": {"name": "resnet10", "widen_factor": 0.125},
                                          "data": {"size": 16}, "train": {"epochs": 3, "batch_size": 16}})
    try:
        pretrain(data, out, cfg, progress=False, log=lambda *a: None)
        q.put((rank, "finished"))
    except TrainingDiverged as e:
        q.put((rank, f"diverged: {e}"))


def test_a_nan_on_one_rank_stops_every_rank_at_the_same_step(tmp_path, phantoms2d):
    # the logged loss is averaged over ranks, so a NaN on rank 1 alone stops rank 0 too (instead of a hang)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_pretrain_worker, args=(r, 2, port, str(phantoms2d), str(tmp_path / "run"), 1, q))
             for r in range(2)]
    for p in procs:
        p.start()
    got = dict(q.get(timeout=240) for _ in procs)
    for p in procs:
        p.join(60)
    assert all(v.startswith("diverged") for v in got.values()), got
    assert "epoch 2, step 1" in got[0] and "epoch 2, step 1" in got[1]  # 3 steps an epoch: step 5 is epoch 2, step 1
    ck = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert ck["global_step"] == 3


def test_torchrun_pretrain_end_to_end(tmp_path, phantoms2d):
    # the CLI under torchrun, 2 gloo processes: rank 0 alone prepares the folder, logs and writes the outputs
    import subprocess
    import sys

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "medcl", "pretrain", str(phantoms2d), "--out", str(out), "--epochs", "2", "--batch-size", "16",
           "--set", "encoder.name=resnet10", "--set", "encoder.widen_factor=0.125", "--set", "data.size=16"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stdout.count("found 48 scans") == 1  # logged by rank 0 only
    rows = (out / "loss.csv").read_text().splitlines()[1:]
    assert [int(x.split(",")[0]) for x in rows] == list(range(1, 7))  # 48 scans / 16 = 3 steps x 2 epochs
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 1
    from medcl.encoders import load_encoder

    enc, _ = load_encoder(out)
    assert enc(torch.rand(2, 1, 16, 16)).shape[0] == 2
