"""The intake of a WORK: the job's task, model and data (built once per job and
shard), and the model the WORK stands for, loaded into it: sent whole, as a delta
against the reference this worker holds, or read where it lies in the
coordinator's shared memory."""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset, TensorDataset

from elastic.compression.chain import CodecChain, Compressor, expand
from elastic.errors import ElasticError, PluginError, ProtocolError
from elastic.plugins import Plugins
from elastic.tasks import Shard, Task
from elastic.training import move_to_fresh_memory, update_template
from elastic.wire.buffers import BufferSet
from elastic.wire.header import Message
from elastic.wire.shared import SharedReader
from elastic.wire.tensors import WireTensor
from elastic.worker.devices import HostStaging

if TYPE_CHECKING:
    from elastic.distributed.state import MemberState

__all__ = ["Intake", "JobContext", "Placer", "keep_newest"]

log = logging.getLogger("elastic.worker.runner")
# On the coordinator's host: gives tensors in the shared-memory segment the next
# update goes through (``SegmentWriter.place``), else None.
Placer = Callable[[dict[str, torch.Tensor], str], dict[str, torch.Tensor] | None]


# Datasets kept per job, newest used first: a worker serving virtual clients trains
# many shards; each is built again once it has dropped out.
DATASETS_KEPT = 16


def keep_newest(kept: OrderedDict[Any, Any], key: Any, value: Any, limit: int) -> None:
    """``kept[key] = value`` as the newest, and only the ``limit`` newest kept."""
    kept[key] = value
    kept.move_to_end(key)
    while len(kept) > limit:
        kept.popitem(last=False)


@dataclass
class JobContext:
    key: str
    task: Task
    model: torch.nn.Module
    dataset: Dataset  # the shard the WORK (or its client) trains on
    datasets: OrderedDict[tuple[int, int], Dataset] = field(default_factory=OrderedDict)
    sent: BufferSet | None = None  # the last update, when its frames alias the model
    received: dict[str, torch.Tensor] = field(
        default_factory=dict
    )  # deltas: the weights trained from
    chain: CodecChain | None = None  # the job's update codec chain, as the last WORK gave it
    compressor: Compressor | None = None  # ... with its codecs' error-feedback state
    reference: dict[str, torch.Tensor] | None = None  # compressed downlink: the model as we hold it
    reference_version: int | None = None
    cast_out: dict[str, torch.Tensor] | None = None  # a one-cast chain's parts, kept across rounds
    cast_sent: BufferSet | None = None  # the last update sent from them
    shared: SharedReader | None = None  # the coordinator's reference in /dev/shm, when on its host
    viewing: bool = False  # the parameters lie in ``shared``'s mapping (taking gradients)
    # virtual clients' codec state, by client (``runner.CLIENT_STATES`` of them at most)
    client_states: OrderedDict[int, Compressor] = field(default_factory=OrderedDict)
    collective: MemberState | None = None  # a collective job's state between generations


class Intake:
    """Keeps one model and dataset per job (rebuilt only if the task or shard
    changes), and loads each WORK's model into it."""

    def __init__(self, plugins: Plugins, device: torch.device, data_dir: Path | None) -> None:
        self.plugins = plugins
        self.device = device
        self.data_dir = data_dir
        self.staging = HostStaging(device)
        self.placer: Placer | None = None
        self.jobs: dict[str, JobContext] = {}

    def take(self, work: Message) -> JobContext | tuple[str, str]:
        """The job's context with the WORK's model loaded into its model; or the
        NACK's reason and detail when this worker cannot hold that model, or
        cannot load the job's task (``task_unavailable``: it sits the job out)."""
        try:
            ctx = self._context(work)
        except PluginError as exc:
            return "task_unavailable", str(exc)
        self._free_for_training(ctx, work)
        model_in = work.tensors
        if (
            ctx.viewing and work.meta.get("downlink") is not True
        ):  # the model comes whole: into memory of our own
            self._leave_shared(ctx, update_template(ctx.model, "gradient"))
        if work.meta.get("downlink") is True:
            held = self._from_reference(ctx, work)
            if isinstance(held, tuple):
                return held
            model_in = held
        self._load(ctx.model, model_in)
        return ctx

    def prepare(self, work: Message) -> JobContext:
        """The job's task, model and ``work``'s shard's data built ahead of its first
        WORK (``work`` says only which: job, task, parameters, seed, shard)."""
        return self._context(work)

    def again(self, ctx: JobContext, work: Message, start: Mapping[str, torch.Tensor]) -> None:
        """The model of a WORK already taken, loaded again from ``start`` (the copy
        kept after the first load), and the data of ``work``'s shard: the WORK's
        next virtual client trains from the same model as the first."""
        self._free_for_training(ctx, work)
        ctx.dataset = self._dataset(ctx, work)
        with torch.no_grad():
            for name, tensor in ctx.model.state_dict().items():
                tensor.copy_(start[name])

    def _free_for_training(self, ctx: JobContext, work: Message) -> None:
        """The model's memory made writable: not what the last update is sent from."""
        if ctx.sent is not None and not ctx.sent.free:  # ZeroMQ still reads the last update
            move_to_fresh_memory(ctx.model)
        ctx.sent = None
        if (
            work.meta["mode"] not in ("gradient", "collective")
            and self.device.type == "cpu"
            and not work.meta.get("codecs")
        ):
            self._into_segment(ctx.model, work.meta["mode"], work.job)

    def _context(self, work: Message) -> JobContext:
        """The job's task and model (built again only if the task changes), and the
        WORK's shard's data."""
        meta = work.meta
        key = json.dumps([meta["task"], meta["task_params"], meta["seed"]], sort_keys=True)
        ctx = self.jobs.get(work.job)
        if ctx is None or ctx.key != key:
            task = self.plugins.task(meta["task"])(meta["task_params"])
            model = task.build_model(int(meta["seed"])).to(self.device)
            ctx = JobContext(key, task, model, dataset=TensorDataset())  # the shard's: below
            self.jobs[work.job] = ctx
            log.info("job loaded job=%s task=%s", work.job, meta["task"])
        ctx.dataset = self._dataset(ctx, work)
        return ctx

    def _dataset(self, ctx: JobContext, work: Message) -> Dataset:
        index, count = int(work.meta["shard"][0]), int(work.meta["shard"][1])
        dataset = ctx.datasets.get((index, count))
        if dataset is None:
            dataset = ctx.task.train_dataset(
                Shard(index, count, int(work.meta["seed"])), self.data_dir
            )
            keep_newest(ctx.datasets, (index, count), dataset, DATASETS_KEPT)
            log.debug(
                "shard loaded job=%s shard=%d/%d samples=%d",
                work.job,
                index,
                count,
                len(dataset),  # type: ignore[arg-type]
            )
        else:
            ctx.datasets.move_to_end((index, count))
        return dataset

    def _load(self, model: torch.nn.Module, tensors: dict[str, WireTensor]) -> None:
        state = model.state_dict()
        if set(state) != set(tensors):
            raise ElasticError(
                "received model does not match the task's model: "
                f"{sorted(set(state) ^ set(tensors))[:5]}"
            )
        with torch.no_grad():
            for name, wt in tensors.items():
                target = state[name]
                if tuple(target.shape) != wt.shape or target.dtype != wt.dtype:
                    raise ElasticError(
                        f"tensor {name!r}: received {list(wt.shape)} {wt.dtype}, model has "
                        f"{list(target.shape)} {target.dtype}"
                    )
                if self.device.type == "cpu":
                    if (
                        len(wt.chunks) == 1
                        and wt.chunks[0].data_ptr() == target.data_ptr()
                        and wt.chunks[0].numel() == target.numel()
                    ):
                        continue  # already there: the reference held in the parameter itself
                    wt.copy_to(target)  # frames straight into the parameters
                else:
                    staged = self.staging.buffer(name, target)
                    wt.copy_to(staged)
                    target.copy_(staged, non_blocking=True)

    def _into_segment(self, model: torch.nn.Module, mode: str, job: str) -> None:
        """Rebind the weights the update will be sent from into the shared-memory
        segment (once; they stay there while each update is released in time): the
        model is then loaded into it and the update leaves with no copy."""
        placer = self.placer
        if placer is None:
            return
        weights = update_template(model, mode)
        placed = placer({k: v.detach() for k, v in weights.items()}, job)
        if placed is None:
            return
        with torch.no_grad():
            for name, tensor in weights.items():
                target = placed[name]
                if tensor.data_ptr() != target.data_ptr():
                    target.copy_(tensor.detach())
                    tensor.data = target

    def _from_reference(
        self, ctx: JobContext, work: Message
    ) -> dict[str, WireTensor] | tuple[str, str]:
        """The model this WORK stands for, when it comes down as a delta against the
        reference we hold (``delta_from``), whole, or to be read from the coordinator's
        shared memory (``shared``); else the NACK's reason and detail."""
        floats = {
            k: (tuple(t.shape), t.dtype) for k, t in update_template(ctx.model, "train").items()
        }
        others = {k: wt for k, wt in work.tensors.items() if k not in floats and "#" not in k}
        # Taking a gradient leaves the parameters as they came, so they can hold the
        # reference themselves: no model-sized copy into the model each round.
        # Buffers (a task may update running statistics) keep a copy of their own.
        in_params = (
            update_template(ctx.model, "gradient")
            if work.meta["mode"] == "gradient" and self.device.type == "cpu"
            else {}
        )
        if "shared" in work.meta:  # on the coordinator's host: read where it lies
            ctx.reference_version = None  # until it is known whole
            ctx.shared = ctx.shared or SharedReader()
            try:
                why = self._read_shared(ctx, work, floats, in_params)
            except ProtocolError as exc:
                return (
                    "no_shared_reference",
                    f"cannot read the coordinator's shared reference: {exc.detail}; send the "
                    "model over the socket",
                )
            if why is not None:
                return "need_full_model", why
        elif "delta_from" not in work.meta:  # the whole reference: keep a copy to apply deltas to
            self._leave_shared(ctx, in_params)
            ctx.reference = {}
            for k, wt in work.tensors.items():
                if (
                    k in in_params
                    and tuple(in_params[k].shape) == wt.shape
                    and in_params[k].dtype == wt.dtype
                ):
                    with torch.no_grad():
                        wt.copy_to(in_params[k])
                    ctx.reference[k] = in_params[k].detach()
                elif k in floats:
                    ctx.reference[k] = wt.to_tensor().clone()
        elif ctx.reference is None or ctx.reference_version != work.meta["delta_from"]:
            return (
                "need_full_model",
                f"this worker holds version {ctx.reference_version}, not "
                f"{work.meta.get('delta_from')}; send the whole model",
            )
        else:
            if ctx.viewing:  # deltas are added in place: to memory of our own
                self._leave_shared(ctx, in_params)
                ctx.reference = {k: in_params[k].detach() for k in ctx.reference}
            delta = expand(work, self.plugins.codecs, floats)
            for name, ref in ctx.reference.items():
                if name in delta:
                    delta[name].add_to(ref)  # widened on the way when the chain is a cast
        assert ctx.reference is not None  # every branch above made or checked it
        ctx.reference_version = work.version
        return others | {k: WireTensor.from_tensor(v) for k, v in ctx.reference.items()}

    def _read_shared(
        self,
        ctx: JobContext,
        work: Message,
        floats: dict[str, tuple[tuple[int, ...], torch.dtype]],
        in_params: dict[str, torch.Tensor],
    ) -> str | None:
        """The coordinator's reference, from its segment: a gradient is taken on it
        where it lies (the parameters are rebound to views of it, once; ``_run``
        checks afterwards that it did not change meanwhile); anything else copies
        it. None when done, else why not."""
        assert ctx.shared is not None
        if in_params and set(in_params) == set(floats):
            views = ctx.shared.view(work.meta["shared"], in_params)
            with torch.no_grad():
                for name, param in in_params.items():
                    if param.data_ptr() != views[name].data_ptr():
                        param.data = views[name]
            ctx.reference = {k: p.detach() for k, p in in_params.items()}
            ctx.viewing = True
            return ctx.shared.stable(work.version)
        self._leave_shared(ctx, in_params)
        if (
            ctx.reference is None
            or {k: (tuple(t.shape), t.dtype) for k, t in ctx.reference.items()} != floats
        ):
            ctx.reference = {
                k: in_params[k].detach() if k in in_params else torch.empty(shape, dtype=dtype)
                for k, (shape, dtype) in floats.items()
            }
        with torch.no_grad():
            return ctx.shared.copy_into(work.meta["shared"], ctx.reference, work.version)

    @staticmethod
    def _leave_shared(ctx: JobContext, in_params: dict[str, torch.Tensor]) -> None:
        """Parameters that view the shared reference get memory of their own before
        anything writes them, and the mapping is dropped: a page written here would
        no longer follow the coordinator's, so a later view maps afresh."""
        if not ctx.viewing:
            return
        with torch.no_grad():
            for param in in_params.values():
                param.data = param.data.clone()
        ctx.viewing = False
        ctx.shared = SharedReader() if ctx.shared is not None else None
