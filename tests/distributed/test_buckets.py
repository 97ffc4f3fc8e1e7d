"""Bucketed all-reduce during backward, among real gloo processes: the sum of every
rank's gradients, unused parameters included, step after step."""

from __future__ import annotations

import multiprocessing
from datetime import timedelta

import torch
import torch.distributed as dist

from elastic.distributed.buckets import BucketedAllReduce
from tests.etcd_server import free_port


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(6, 5), torch.nn.Linear(5, 1)
        self.unused = torch.nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def _grads(rank: int, step: int) -> dict[str, torch.Tensor]:
    net = Net()
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(rank * 100 + step))
    net(x).pow(2).mean().backward()
    return {
        n: (p.grad if p.grad is not None else torch.zeros_like(p))
        for n, p in net.named_parameters()
    }


def _rank(rank: int, port: int, out: multiprocessing.Queue) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, timedelta(seconds=30))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    net = Net()
    buckets = BucketedAllReduce(net.parameters(), bucket_bytes=16)  # several buckets
    got = []
    for step in range(2):
        for p in net.parameters():
            p.grad.zero_()
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(rank * 100 + step))
        net(x).pow(2).mean().backward()
        buckets.finish()
        got.append({n: p.grad.tolist() for n, p in net.named_parameters()})
    out.put((rank, len(buckets.buckets), got))
    buckets.close()
    dist.destroy_process_group()


def test_every_gradient_is_the_sum_over_ranks_each_step():
    ctx, port = multiprocessing.get_context("spawn"), free_port()
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, (n, g)) for r, n, g in (out.get(timeout=60) for _ in procs))
    for p in procs:
        p.join(30)
    for rank in (0, 1):
        count, got = results[rank]
        assert count >= 3
        for step in range(2):
            want = {n: _grads(0, step)[n] + _grads(1, step)[n] for n in got[step]}
            for name, value in want.items():
                assert torch.allclose(torch.tensor(got[step][name]), value, atol=1e-6), (step, name)
