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
    full_loss = dist.all_reduce_mean(loss.item())  # the global loss is the mean of the per-rank means
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
