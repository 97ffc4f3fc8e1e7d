"""Handing training state to a generation: the optimizer's state as tensors and a
layout, and a broadcast from the right rank among real gloo processes."""

from __future__ import annotations

import multiprocessing
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from elastic.distributed.sampling import Position
from elastic.distributed.state import (
    MemberState,
    NoState,
    load_optimizer,
    optimizer_tensors,
    share_state,
)
from tests.etcd_server import free_port


def _trained(
    seed: int, steps: int, kind: str = "adam"
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))
    make = (
        torch.optim.Adam if kind == "adam" else lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)
    )
    opt = make(model.parameters())
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).mean().backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_optimizer_state_round_trips_into_a_fresh_optimizer(kind):
    model, opt = _trained(0, 3, kind)
    layout, tensors = optimizer_tensors(opt)
    assert tensors and all(name.startswith("optimizer/") for name in tensors)
    _, fresh = _trained(1, 0, kind)  # a joiner: no state yet
    load_optimizer(fresh, layout, {k: v.clone() for k, v in tensors.items()})
    want, got = opt.state_dict(), fresh.state_dict()

    def as_lists(groups: list[dict]) -> list[dict]:
        return [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in groups]

    assert as_lists(want["param_groups"]) == as_lists(
        got["param_groups"]
    )  # (msgpack: tuples are lists)
    for param, values in want["state"].items():
        for key, value in values.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(got["state"][param][key]))


def _member(rank: int, world: int, port: int, plan: dict, out: multiprocessing.Queue) -> None:
    """First nobody holds state (all must say so), then the ``plan``'s holders do."""
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timedelta(seconds=30))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        _, fresh = _trained(rank, 0)
        share_state(_trained(rank, 0)[0], MemberState(fresh), torch.device("cpu"))
        out.put((rank, "a source without state"))
    except NoState:
        pass
    steps = plan.get(rank)
    model, opt = _trained(rank, steps or 0)
    member = MemberState(
        opt, Position(steps or 0, 0, 7 * (steps or 0)), has_state=steps is not None
    )
    source, position = share_state(model, member, torch.device("cpu"))
    _, tensors = optimizer_tensors(opt)
    out.put(
        (
            rank,
            source,
            position,
            {k: v.tolist() for k, v in model.state_dict().items()},  # (not shared memory:
            {k: v.tolist() for k, v in tensors.items()},  # this process exits at once)
        )
    )
    dist.destroy_process_group()


def _run(plan: dict, world: int) -> dict:
    ctx, port = multiprocessing.get_context("spawn"), free_port()
    out = ctx.Queue()
    procs = [ctx.Process(target=_member, args=(r, world, port, plan, out)) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    for _ in procs:
        item = out.get(timeout=60)
        results[item[0]] = item[1:]
    for p in procs:
        p.join(30)
    return results


def test_nobody_or_the_lowest_rank_at_the_oldest_step_is_the_source_for_all():
    # With no holder every rank raises NoState. Then rank 0 joined afresh, rank 1 is at
    # step 5, rank 2 one step ahead (its last all-reduce went through before the group
    # broke): all resume at step 5 from rank 1.
    results = _run({1: 5, 2: 6}, 3)
    want_model, want_optimizer = _trained(1, 5)
    _, want_tensors = optimizer_tensors(want_optimizer)
    for rank in range(3):
        source, position, model, tensors = results[rank]
        assert source == 1 and position == Position(5, 0, 35)
        for name, value in want_model.state_dict().items():
            assert torch.equal(torch.tensor(model[name]), value), (rank, name)
        assert tensors.keys() == want_tensors.keys()
        for name, value in want_tensors.items():
            assert torch.equal(torch.tensor(tensors[name]), value), (rank, name)
