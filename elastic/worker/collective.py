"""A collective rule's work: one generation of data-parallel training with the other
members, gradients all-reduced peer to peer (``elastic.rules.CollectiveRule``).

A WORK names the generation, this member's rank, the world size, the store to meet
in and how many steps the job has. The member joins the generation's process group
(gloo, or NCCL on CUDA; the store prefixed by job and generation), takes the state
of the lowest rank holding the oldest state (``elastic.distributed.state``), and
trains, its gradients all-reduced in buckets during the backward pass
(``elastic.distributed.buckets``). It
leaves the generation, in the same process, when:

- a newer WORK came for the job (a member joined or left): every rank learns it
  through a flag all-reduced with each step, so all stop after the same step;
- a collective failed (a peer died, or was silent past the rule's timeout): the
  group is broken; the state is kept for the next generation;
- the job's steps are done.

It reports as UPDATEs of kind ``checkpoint`` under keys of their own: rank 0 its
progress (about twice a second), its checkpoints (model, optimizer state and
position, every ``checkpoint_every`` steps) and the final model; every rank how its
generation ended.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from elastic.distributed import packed
from elastic.distributed.buckets import BucketedAllReduce
from elastic.distributed.sampling import Position, step_slice
from elastic.distributed.state import (
    MemberState,
    NoState,
    load_optimizer,
    optimizer_tensors,
    share_state,
)
from elastic.errors import ElasticError
from elastic.jobspec import TrainParams
from elastic.training import _batches, _optimizer, dataset_tensors
from elastic.wire.buffers import BufferPool
from elastic.wire.header import Message, MsgType
from elastic.wire.tensors import WireTensor
from elastic.worker.intake import JobContext
from elastic.worker.packing import Result

__all__ = ["CollectiveTraining", "StoreOpener"]

log = logging.getLogger("elastic.worker.collective")
PROGRESS_EVERY = 0.5  # seconds between rank 0's progress reports
GENERATION_KEYS = ("generation", "rank", "world", "store", "steps", "settings")

StoreOpener = Callable[[str, str], Any]  # (store spec, job) -> a c10d store


def _check(meta: Any) -> dict[str, Any]:
    """The WORK's ``collective`` entry, checked (it is the coordinator's, but checked)."""
    if not isinstance(meta, dict) or not all(k in meta for k in GENERATION_KEYS):
        raise ElasticError(
            f"a collective WORK needs {', '.join(GENERATION_KEYS)}; got {meta!r:.200}"
        )
    ints = ("generation", "rank", "world", "steps")
    if not all(type(meta[k]) is int for k in ints) or not 0 <= meta["rank"] < meta["world"]:
        raise ElasticError(f"bad collective generation {meta!r:.200}")
    return meta


class CollectiveTraining:
    """Runs generations of a collective job for one worker (the ``collective`` mode)."""

    modes = ("collective",)

    def __init__(self, device: torch.device, worker_id: str, open_store: StoreOpener) -> None:
        self.device = device
        self.worker_id = worker_id
        self.open_store = open_store
        self.outbox = BufferPool(pin=device.type == "cuda")

    def session(
        self, ctx: JobContext, work: Message, superseded: Callable[[], bool]
    ) -> Iterator[Result]:
        """The reports of one generation, as they come; ends when the generation does."""
        meta = _check(work.meta.get("collective"))
        settings, train = meta["settings"], TrainParams(**work.meta["train"])
        member = ctx.collective
        if member is None:
            member = ctx.collective = MemberState(
                _optimizer(ctx.model, self._params(train, settings))
            )
        self._take_given_state(ctx, work, meta, member)
        started = time.perf_counter()
        rank, world, generation = meta["rank"], meta["world"], meta["generation"]
        backend = settings.get("backend", "auto")
        if backend == "auto":
            backend = "nccl" if self.device.type == "cuda" else "gloo"
        try:
            base = self.open_store(str(meta["store"]), work.job)
            store = dist.PrefixStore(f"{work.job}/{generation}", base)
            dist.init_process_group(
                backend,
                store=store,
                rank=rank,
                world_size=world,
                timeout=timedelta(seconds=float(settings.get("timeout", 30.0))),
                device_id=self.device if self.device.type == "cuda" else None,
            )
        except Exception as exc:
            yield self._report(work, member, "broken", started, detail=f"forming the group: {exc}")
            return
        log.info(
            "generation formed job=%s generation=%d rank=%d world=%d backend=%s",
            work.job, generation, rank, world, backend,
        )  # fmt: skip
        end, detail = "done", ""
        try:
            source, position = share_state(ctx.model, member, self.device)
            log.info(
                "state taken job=%s generation=%d from_rank=%d step=%d",
                work.job, generation, source, position.step,
            )  # fmt: skip
            yield from self._train(ctx, work, meta, member, superseded, started)
            end = "stopped" if member.position.step < meta["steps"] else "done"
        except NoState as exc:
            end, detail = "broken", str(exc)
        except ElasticError:
            raise
        except Exception as exc:  # a collective failed: a peer died or went silent
            end, detail = "broken", f"{type(exc).__name__}: {str(exc)[:300]}"
            log.warning("generation broken job=%s generation=%d: %s", work.job, generation, detail)
        finally:
            _leave_group()
        if end == "done" and rank == 0:
            yield self._checkpoint(ctx, work, member, "done", started)
        else:
            yield self._report(work, member, end, started, detail=detail)

    def _params(self, train: TrainParams, settings: dict[str, Any]) -> TrainParams:
        return TrainParams(
            batch_size=train.batch_size,
            lr=float(settings.get("lr", train.lr)),
            optimizer=str(settings.get("optimizer", "sgd")),
            momentum=float(settings.get("momentum", 0.0)),
            weight_decay=float(settings.get("weight_decay", 0.0)),
        )

    def _take_given_state(
        self, ctx: JobContext, work: Message, meta: dict[str, Any], member: MemberState
    ) -> None:
        """The coordinator's state (a checkpoint, or the job's start), when it sends one."""
        if not work.tensors:
            return
        state = ctx.model.state_dict()
        missing = set(state) - set(work.tensors)
        if missing:
            raise ElasticError(f"the collective WORK's model lacks {sorted(missing)[:5]}")
        with torch.no_grad():
            for name, tensor in state.items():
                work.tensors[name].copy_to(tensor)
        optimizer = {
            k: t.to_tensor().to(self.device)
            for k, t in work.tensors.items()
            if k.startswith("optimizer/")
        }
        layout = bytes.fromhex(str(meta.get("layout", "")))
        if layout:
            load_optimizer(member.optimizer, layout, optimizer)
        at = meta.get("position", {})
        member.position = Position(
            int(at.get("step", 0)), int(at.get("epoch", 0)), int(at.get("offset", 0))
        )
        member.has_state = True

    def _train(
        self,
        ctx: JobContext,
        work: Message,
        meta: dict[str, Any],
        member: MemberState,
        superseded: Callable[[], bool],
        started: float,
    ) -> Iterator[Result]:
        buckets = BucketedAllReduce(ctx.model.parameters())
        try:
            yield from self._steps(ctx, work, meta, member, buckets, superseded, started)
        finally:
            buckets.close()

    def _steps(
        self,
        ctx: JobContext,
        work: Message,
        meta: dict[str, Any],
        member: MemberState,
        buckets: BucketedAllReduce,
        superseded: Callable[[], bool],
        started: float,
    ) -> Iterator[Result]:
        rank, world, steps = meta["rank"], meta["world"], meta["steps"]
        every = int(meta["settings"].get("checkpoint_every", 20))
        batch = int(work.meta["train"].get("batch_size", 32))
        data = dataset_tensors(ctx.dataset, self.device)
        if data is None:  # not in memory: gathered through a loader once
            data = next(_batches(ctx.dataset, 0, self.device, None))
        x, y = data
        size, seed = len(y), int(work.meta["seed"])
        flags = torch.zeros(2, dtype=torch.float64, device=self.device)
        reported, timed = 0.0, 0  # (0: rank 0 reports its first step at once)
        member.durations.clear()
        ctx.model.train()
        while member.position.step < steps:
            began = time.perf_counter()
            piece = step_slice(size, seed, member.position, world, rank, batch)
            idx = piece.indices.to(self.device)
            empty = idx.numel() == 0
            if empty:  # more ranks than samples left in the epoch: take part with weight 0
                idx = torch.zeros(1, dtype=torch.long, device=self.device)
            member.optimizer.zero_grad(set_to_none=False)
            try:
                loss = ctx.task.loss(ctx.model, x[idx], y[idx])
            except Exception as exc:
                raise ElasticError(f"the task's loss failed: {type(exc).__name__}: {exc}") from exc
            weight = 0.0 if empty else len(idx) / piece.global_count
            (loss * weight).backward()  # summed over ranks: the gradient of the global mean
            buckets.finish()
            flags[0] = 1.0 if superseded() else 0.0
            flags[1] = 0.0 if empty else float(loss.detach()) * len(idx)
            dist.all_reduce(flags)
            member.optimizer.step()
            member.position = piece.after
            member.loss = float(flags[1]) / piece.global_count
            member.samples = piece.global_count
            timed += 1
            if timed > 2:  # (the first two warm up)
                member.durations.append(time.perf_counter() - began)
            if rank == 0:
                step = member.position.step
                if step % every == 0 and step < steps:
                    yield self._checkpoint(ctx, work, member, "checkpoint", started)
                elif time.monotonic() - reported >= PROGRESS_EVERY:
                    reported = time.monotonic()
                    yield self._report(work, member, "progress", started)
            if flags[0] > 0:
                return

    def _report(
        self, work: Message, member: MemberState, end: str, started: float, detail: str = ""
    ) -> Result:
        at = member.position
        collective = {
            "generation": int(work.meta["collective"]["generation"]),
            "step": at.step,
            "epoch": at.epoch,
            "offset": at.offset,
            "end": end,
            "holds": member.has_state,
            "step_seconds": member.step_seconds,
        }
        if detail:
            collective["detail"] = detail[:500]
        return Result(
            Message(
                MsgType.UPDATE,
                job=work.job,
                round=at.step,
                version=work.version,
                sender=self.worker_id,
                key=f"{work.key}/{at.step}/{end}",
                meta={
                    "num_samples": int(member.samples),
                    "loss": float(member.loss),
                    "kind": "checkpoint",
                    "train_seconds": time.perf_counter() - started,
                    "collective": collective,
                },
            )
        )

    def _checkpoint(
        self, ctx: JobContext, work: Message, member: MemberState, end: str, started: float
    ) -> Result:
        result = self._report(work, member, end, started)
        optimizer_layout, optimizer = optimizer_tensors(member.optimizer)
        tensors = {k: v.detach() for k, v in ctx.model.state_dict().items()} | optimizer

        def buffer(total: int) -> torch.Tensor:  # pooled: training goes on while it is sent
            like = {packed.NAME: torch.empty(total, dtype=torch.uint8, device="meta")}
            result.buffers = self.outbox.acquire(like)
            return result.buffers.tensors[packed.NAME]

        layout, flat = packed.pack(tensors, buffer)
        result.message.tensors = {packed.NAME: WireTensor.from_tensor(flat)}
        result.message.meta["collective"] |= {"layout": optimizer_layout.hex(), "tensors": layout}
        return result


def _leave_group() -> None:
    """Leave this generation's group, whatever state it is in."""
    if dist.is_initialized():
        gc.collect()  # a failed step's frames may hold the group's pending work
        try:
            dist.destroy_process_group()
        except Exception as exc:  # a broken group may fail to close: it is dropped anyway
            log.debug("leaving a broken group: %s", exc)
