"""One synchronous data-parallel step, elastic ``syncavg`` against torch.distributed gloo.

Both sides average the gradient of a 25M-parameter float32 model over 2 workers, on
this machine's loopback, in the same run:

* ``gloo``: ``all_reduce`` of a random 25M-float tensor between 2 processes
  (``init_process_group("gloo")``): the communication of one DDP step.
* ``elastic``: the real daemons (a coordinator and 2 workers, plaintext like gloo) run
  a ``syncavg`` job on the ``synthetic`` task. A step sends the model to each worker,
  each sends its gradient back, the coordinator averages and steps the model. Its
  communication part is the time from one commit to the next (everything: the
  model's step, the WORK, the gradients' way back and their fold) less the slowest
  worker's own compute (``train_seconds_max`` in the round history).
* ``elastic fp16``: the same with the ``fp16`` codec on the gradient and the model.

Both elastic paths run twice: as they are (the workers share the coordinator's host,
so tensors go through ``/dev/shm``: each worker takes its gradient on the
coordinator's shared copy of the model, and sends it from its own segment), and with
``--no-shared-memory`` (loopback TCP, the path of workers on other hosts). gloo has
no shared-memory transport: it uses TCP on loopback too.

gloo is measured again just before each elastic path, and each ratio is taken against
the gloo time of its own minute: on a shared machine the speed drifts by 20-30 % from
one minute to the next, as much as the margins measured. Prints the medians and the
ratios elastic / gloo (targets: <= 2 uncompressed, <= 1 with fp16).

    python benchmarks/vs_gloo.py [--params 25_000_000] [--steps 15]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist

from benchmarks.cluster import free_port, run_job, synthetic_job
from benchmarks.plotting import bar_chart

WARMUP = 2


def gloo_rank(rank: int, port: int, params: int, steps: int, out: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    grad = torch.randn(params, generator=torch.Generator().manual_seed(rank))
    times = []
    for _ in range(WARMUP + steps):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(grad)
        times.append(time.perf_counter() - start)
    # A step ends when both ranks hold the sum: the slower rank's time.
    gathered = [torch.zeros(len(times), dtype=torch.float64) for _ in range(2)]
    dist.all_gather(gathered, torch.tensor(times, dtype=torch.float64))
    if rank == 0:
        out.put(torch.stack(gathered).max(dim=0).values[WARMUP:].tolist())
    dist.destroy_process_group()


def gloo_times(params: int, steps: int) -> list[float]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=gloo_rank, args=(r, port, params, steps, out)) for r in range(2)]
    for p in procs:
        p.start()
    times = out.get(timeout=600)
    for p in procs:
        p.join()
    return times


def elastic_job(params: int, steps: int, codec: str | None) -> str:
    compression = f'[compression]\nupdate = ["{codec}"]\nmodel = ["{codec}"]\n' if codec else ""
    return synthetic_job(
        "vs-gloo",
        "syncavg",
        WARMUP + steps,
        params,
        workers=2,
        rule_table="lr = 0.01",
        extra=compression,
    )


def elastic_times(
    params: int, steps: int, codec: str | None, shared_memory: bool
) -> tuple[list[float], list[float]]:
    """(communication part, whole step) of each timed step."""
    off = () if shared_memory else ("--no-shared-memory",)
    run = run_job(
        elastic_job(params, steps, codec), workers=2, coordinator_args=off, worker_args=off
    )
    rounds = run.rounds(WARMUP - 1)  # the round before the first timed one: where its cycle starts
    cycles = [
        (b["at"] - a["at"], b["train_seconds_max"])
        for a, b in zip(rounds, rounds[1:], strict=False)
    ]
    return [cycle - train for cycle, train in cycles], [cycle for cycle, _ in cycles]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", type=int, default=25_000_000)
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args()
    print(
        f"{args.params:,} float32 parameters ({args.params * 4 / 1e6:.0f} MB), 2 workers, median "
        f"of {args.steps} steps after {WARMUP} warm-up"
    )
    print(
        "gloo runs again just before each elastic path: each ratio is against the gloo time of "
        "its own minute"
    )
    rows = []
    for label, codec, shm in (
        ("elastic syncavg", None, True),
        ("elastic syncavg fp16", "fp16", True),
        ("elastic syncavg (tcp)", None, False),
        ("elastic fp16 (tcp)", "fp16", False),
    ):
        gloo = statistics.median(gloo_times(args.params, args.steps))
        comm, whole = elastic_times(args.params, args.steps, codec, shm)
        rows.append((label, gloo, statistics.median(comm), statistics.median(whole)))
    print(f"{'path':<22} {'gloo ms':>8} {'comm ms':>9} {'step ms':>9} {'comm / gloo':>12}")
    for label, gloo, comm, whole in rows:
        print(
            f"{label:<22} {gloo * 1e3:>8.1f} {comm * 1e3:>9.1f} {whole * 1e3:>9.1f} "
            f"{comm / gloo:>12.2f}"
        )
    ratio = {label: comm / gloo for label, gloo, comm, _ in rows}
    print(
        f"elastic / gloo = {ratio['elastic syncavg']:.2f} (target <= 2); elastic fp16 / gloo = "
        f"{ratio['elastic syncavg fp16']:.2f} (target <= 1)"
    )
    print(
        f"over loopback TCP: elastic / gloo = {ratio['elastic syncavg (tcp)']:.2f}; elastic fp16 "
        f"/ gloo = {ratio['elastic fp16 (tcp)']:.2f}"
    )
    gloo_mean = statistics.mean(gloo for _, gloo, _, _ in rows)
    bars = {"gloo all_reduce (tcp)": gloo_mean * 1e3} | {
        label: comm * 1e3 for label, _, comm, _ in rows
    }
    bar_chart(
        "vs_gloo", "communication per step (ms), same run (gloo: mean of its runs)", bars, "ms"
    )


if __name__ == "__main__":
    main()
