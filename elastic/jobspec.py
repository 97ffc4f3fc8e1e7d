"""Job specs: a TOML file that says what to train, with which rule, for how long.

```toml
[job]
task = "digits"          # a Task plugin, or a class: "my_tasks:MyTask", "./my_task.py:MyTask"
rule = "fedavg"          # an Aggregator plugin, or a class, the same way
rounds = 30
min_workers = 4
[task]                   # passed to the task
[rule]                   # passed to the rule
[train]                  # the worker runtime's local training
[checkpoint]
[privacy]                # a privacy mechanism and its settings (mechanism = "dp" by default)
```

Everything is checked once, at load: an unknown key, a wrong type or a value out of
range is a ``JobSpecError`` naming the file, the key and the fix.
"""

from __future__ import annotations

import difflib
import math
import re
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from elastic.errors import JobSpecError
from elastic.references import absolute_reference, is_relative_file
from elastic.typecheck import coerce, type_names

__all__ = [
    "JobSpec",
    "TrainParams",
    "CheckpointPolicy",
    "CompressionPolicy",
    "UpdateLimits",
    "load_job_spec",
    "parse_job_spec",
]

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
MAX_CLIENTS = 10_000_000
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class TrainParams:
    """How a worker trains locally (``[train]``)."""

    local_epochs: int = 1
    batch_size: int = 32  # 0 = the whole shard in one batch
    lr: float = 0.05
    optimizer: str = "sgd"  # sgd | adam
    momentum: float = 0.0
    weight_decay: float = 0.0
    prox_mu: float = 0.0  # FedProx: mu/2 * ||w - w_received||^2 added to every task's loss
    # The forward pass under autocast: "bf16", or "fp16" (with a gradient scaler on
    # CUDA); the weights and the update stay fp32.
    precision: str = "fp32"
    # System heterogeneity (the FedProx paper's stragglers): this share of each round's
    # clients, drawn from the job's seed, does a number of epochs drawn uniformly from
    # straggler_epochs ([low, high], default [1, local_epochs]) instead of local_epochs;
    # with drop_stragglers they are not asked at all (FedAvg's way of handling them).
    stragglers: float = 0.0
    straggler_epochs: tuple[int, ...] = ()
    drop_stragglers: bool = False

    def __post_init__(self) -> None:  # (a list from TOML, a checkpoint or the wire)
        object.__setattr__(self, "straggler_epochs", tuple(self.straggler_epochs))


@dataclass(frozen=True)
class CheckpointPolicy:
    """When checkpoints are written (``[checkpoint]``)."""

    every: int = 1  # rounds between checkpoints; 1 = a crash loses at most the round in progress
    keep: int = 3  # newest checkpoints kept


@dataclass(frozen=True)
class CompressionPolicy:
    """How tensors travel (``[compression]``): codec chains, e.g.
    ``update = ["topk:0.01", "fp16", "zstd"]`` for updates, and ``model`` for the model
    sent down as a delta against the version a worker holds. Empty: sent as they are."""

    update: tuple[str, ...] = ()
    model: tuple[str, ...] = ()


@dataclass(frozen=True)
class UpdateLimits:
    """What an update may be (``[limits]``); 0 turns a limit off."""

    max_update_bytes: int = 0  # as received (compressed), per update
    max_norm: float = (
        0.0  # L2 norm of the update's change (trained minus sent weights, or the gradient)
    )
    norm_action: str = "reject"  # reject | clip (scaled down to max_norm)
    max_updates_per_minute: int = 0  # per worker
    # The most samples one update may claim (its weight in FedAvg): over it, or over
    # what the worker says it holds times its epochs, the claim is clipped or refused.
    max_samples_per_update: int = 0
    samples_action: str = "clip"  # clip (down to the bound) | reject


@dataclass(frozen=True)
class JobSpec:
    """A validated job."""

    id: str
    task: str
    rule: str
    rounds: int = 10
    min_workers: int = 1
    max_workers: int = 0  # 0 = every member takes part
    fraction: float = 1.0
    round_timeout: float = 60.0
    eval_every: int = 1
    seed: int = 0
    partitions: int = 0  # data shards; 0 = clients, max_workers, else min_workers
    # Virtual clients: logical clients, each with its own partition, sampled per round
    # (clients_per_round, or fraction of them rounded up) and served by the workers
    # there are; 0 = each worker is one client, its slot's partition.
    clients: int = 0
    clients_per_round: int = 0
    # "random": a uniform sample of clients_per_round each round | "poisson": each client
    # with probability clients_per_round / clients | "cycle": every client once per pass
    client_sampling: str = "random"
    task_params: dict[str, Any] = field(default_factory=dict)
    rule_params: dict[str, Any] = field(default_factory=dict)
    train: TrainParams = field(default_factory=TrainParams)
    checkpoint: CheckpointPolicy = field(default_factory=CheckpointPolicy)
    compression: CompressionPolicy = field(default_factory=CompressionPolicy)
    limits: UpdateLimits = field(default_factory=UpdateLimits)
    # The [privacy] table: ``mechanism`` (a privacy plugin) and its parameters; {}: none.
    privacy: dict[str, Any] = field(default_factory=dict)

    @property
    def population(self) -> int:
        """How many clients the job's data belongs to: its virtual clients, else its
        shards (each worker trains its slot's)."""
        return self.clients or self.shard_count

    @property
    def per_round(self) -> int:
        """How many clients a round asks, with every shard served by one worker:
        the virtual clients sampled, else ``fraction`` of the shards (at least
        ``min_workers``, at most ``max_workers``)."""
        if self.clients:
            return self.sampled_clients
        count = max(self.min_workers, math.ceil(self.fraction * self.shard_count - 1e-9))
        return min(count, self.max_workers or count, self.shard_count)

    @property
    def shard_count(self) -> int:
        return self.clients or self.partitions or self.max_workers or self.min_workers

    @property
    def sampled_clients(self) -> int:
        """Clients asked each round (virtual clients): ``clients_per_round``, else
        ``fraction`` of ``clients`` rounded up (0.3 of 10 is 3; 0.31 of 10 is 4)."""
        if not self.clients:
            return 0
        return self.clients_per_round or max(1, math.ceil(self.fraction * self.clients - 1e-9))

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain data (for checkpoints and the wire)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        data = dict(data)
        data["train"] = TrainParams(**data["train"])
        data["checkpoint"] = CheckpointPolicy(**data["checkpoint"])
        compression = data.get("compression", {})
        data["compression"] = CompressionPolicy(
            update=tuple(compression.get("update", ())), model=tuple(compression.get("model", ()))
        )
        data["limits"] = UpdateLimits(**data.get("limits", {}))
        return cls(**data)


# key -> (type, check, what a good value looks like)
_JOB_KEYS: dict[str, tuple[type | tuple[type, ...], Any, str]] = {
    "id": (str, lambda v: bool(_ID.match(v)), 'letters, digits, "._-", e.g. id = "digits-1"'),
    "task": (
        str,
        bool,
        'a task name, e.g. task = "digits", or a class: "my_tasks:MyTask", "./my_task.py:MyTask"',
    ),
    "rule": (
        str,
        bool,
        'a rule name, e.g. rule = "fedavg", or a class: "my_rules:MyRule", "./my_rule.py:MyRule"',
    ),
    "rounds": (int, lambda v: v >= 1, "a positive integer, e.g. rounds = 30"),
    "min_workers": (int, lambda v: v >= 1, "a positive integer, e.g. min_workers = 2"),
    "max_workers": (int, lambda v: v >= 0, "0 (no limit) or a positive integer"),
    "fraction": (float, lambda v: 0 < v <= 1, "in (0, 1], e.g. fraction = 0.5"),
    "round_timeout": (float, lambda v: v > 0, "seconds > 0, e.g. round_timeout = 60"),
    "eval_every": (int, lambda v: v >= 0, "0 (only at the end) or a positive integer"),
    "seed": (int, lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)"),
    "partitions": (
        int,
        lambda v: v >= 0,
        "0 (= clients, max_workers or min_workers) or a positive integer",
    ),
    "clients": (
        int,
        lambda v: 0 <= v <= MAX_CLIENTS,
        f"0 (each worker is a client) or a number of virtual clients up to {MAX_CLIENTS}",
    ),
    "clients_per_round": (
        int,
        lambda v: v >= 0,
        "0 (fraction of clients, rounded up) or a positive integer",
    ),
    "client_sampling": (
        str,
        lambda v: v in ("random", "poisson", "cycle"),
        '"random" (a uniform sample each round), "poisson" (each client with probability '
        'clients_per_round / clients) or "cycle" (every client once per pass)',
    ),
}
_TRAIN_KEYS: dict[str, tuple[type | tuple[type, ...], Any, str]] = {
    "local_epochs": (int, lambda v: v >= 1, "a positive integer"),
    "batch_size": (int, lambda v: v >= 0, "0 (whole shard) or a positive integer"),
    "lr": (float, lambda v: v > 0, "a learning rate > 0, e.g. lr = 0.05"),
    "optimizer": (str, lambda v: v in ("sgd", "adam"), 'one of "sgd", "adam"'),
    "momentum": (float, lambda v: 0 <= v < 1, "in [0, 1)"),
    "weight_decay": (float, lambda v: v >= 0, ">= 0"),
    "prox_mu": (float, lambda v: v >= 0, ">= 0"),
    "precision": (str, lambda v: v in PRECISIONS, 'one of "fp32", "bf16", "fp16"'),
    "stragglers": (float, lambda v: 0 <= v <= 1, "a share of clients in [0, 1], e.g. 0.5"),
    "straggler_epochs": (
        list,
        lambda v: len(v) == 2 and all(isinstance(x, int) and x >= 1 for x in v) and v[0] <= v[1],
        "[low, high], epochs a straggler draws from, e.g. [1, 5]",
    ),
    "drop_stragglers": (bool, lambda v: True, "true or false"),
}
_CHECKPOINT_KEYS: dict[str, tuple[type | tuple[type, ...], Any, str]] = {
    "every": (int, lambda v: v >= 1, "a positive integer (rounds between checkpoints)"),
    "keep": (int, lambda v: v >= 1, "a positive integer (checkpoints kept)"),
}
_STAGE = re.compile(r"^[A-Za-z0-9_.-]+(:[^\s:]+)?$")
_CHAIN = (
    list,
    lambda v: all(isinstance(x, str) and _STAGE.match(x) for x in v) and len(v) <= 16,
    'a list of codec stages, e.g. ["topk:0.01", "fp16", "zstd"]',
)
_COMPRESSION_KEYS: dict[str, tuple[type | tuple[type, ...], Any, str]] = {
    "update": _CHAIN,
    "model": _CHAIN,
}
_LIMIT_KEYS: dict[str, tuple[type | tuple[type, ...], Any, str]] = {
    "max_update_bytes": (int, lambda v: v >= 0, "bytes per update, 0 for no limit"),
    "max_norm": (
        float,
        lambda v: v >= 0,
        "the largest L2 norm of an update's change, 0 for no limit",
    ),
    "norm_action": (str, lambda v: v in ("reject", "clip"), '"reject" or "clip"'),
    "max_updates_per_minute": (
        int,
        lambda v: v >= 0,
        "updates a worker may send per minute, 0 for no limit",
    ),
    "max_samples_per_update": (
        int,
        lambda v: v >= 0,
        "the most samples one update may claim, 0 for no limit but the worker's data",
    ),
    "samples_action": (str, lambda v: v in ("reject", "clip"), '"reject" or "clip"'),
}
_TABLES = {"job", "task", "rule", "train", "checkpoint", "compression", "limits", "privacy"}


def load_job_spec(path: str | Path) -> JobSpec:
    """Read and validate a job spec file; the job id defaults to the file's stem."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JobSpecError(
            f"job spec {p} does not exist; give the path of a .toml job file"
        ) from None
    except OSError as exc:
        raise JobSpecError(f"job spec {p} cannot be read: {exc.strerror}") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise JobSpecError(f"{p}: not valid TOML ({exc}); fix the syntax") from exc
    return parse_job_spec(data, source=str(p), default_id=p.stem, base_dir=p.parent)


def parse_job_spec(
    data: dict[str, Any],
    source: str = "job spec",
    default_id: str = "job",
    base_dir: Path | None = None,
) -> JobSpec:
    """Validate a job spec given as parsed TOML. A task or rule given as a file
    (``"./my_task.py:MyTask"``) is made absolute against ``base_dir``, the job
    file's directory (``elastic.references``)."""
    for table in data:
        if table not in _TABLES:
            raise JobSpecError(f"{source}: unknown table [{table}]{_suggest(table, _TABLES)}")
    for table in _TABLES:
        if table in data and not isinstance(data[table], dict):
            raise JobSpecError(f"{source}: [{table}] must be a table")
    job = dict(data.get("job", {}))
    for required in ("task", "rule"):
        if required not in job:
            raise JobSpecError(
                f"{source}: [job] {required} is missing; add it, e.g. {_JOB_KEYS[required][2]}"
            )
    job.setdefault("id", _sanitize_id(default_id))
    job_values = _check_table(source, "job", job, _JOB_KEYS)
    for key in ("task", "rule"):
        job_values[key] = _code_path(source, key, job_values[key], base_dir)
    train = _check_table(source, "train", data.get("train", {}), _TRAIN_KEYS)
    ckpt = _check_table(source, "checkpoint", data.get("checkpoint", {}), _CHECKPOINT_KEYS)
    compression = _check_table(
        source, "compression", data.get("compression", {}), _COMPRESSION_KEYS
    )
    limits = _check_table(source, "limits", data.get("limits", {}), _LIMIT_KEYS)
    spec = JobSpec(
        **job_values,
        task_params=dict(data.get("task", {})),
        rule_params=dict(data.get("rule", {})),
        train=TrainParams(**train),
        checkpoint=CheckpointPolicy(**ckpt),
        compression=CompressionPolicy(
            update=tuple(compression.get("update", ())), model=tuple(compression.get("model", ()))
        ),
        limits=UpdateLimits(**limits),
        privacy=_privacy(source, data.get("privacy", {})),
    )
    if spec.max_workers and spec.max_workers < spec.min_workers:
        raise JobSpecError(
            f"{source}: [job] max_workers = {spec.max_workers} is below min_workers = "
            f"{spec.min_workers}; raise max_workers or lower min_workers"
        )
    _check_clients(source, spec)
    _check_stragglers(source, spec.train)
    return spec


def _privacy(source: str, table: dict[str, Any]) -> dict[str, Any]:
    """The [privacy] table with its mechanism named; the mechanism checks the rest."""
    if not table:
        return {}
    mechanism = table.get("mechanism", "dp")
    if not isinstance(mechanism, str) or not mechanism:
        raise JobSpecError(
            f"{source}: [privacy] mechanism must be a name, got {mechanism!r}; use "
            'mechanism = "dp" (differential privacy) or "secagg" (secure aggregation)'
        )
    return {**table, "mechanism": mechanism}


def _check_clients(source: str, spec: JobSpec) -> None:
    if not spec.clients:
        if spec.clients_per_round:
            raise JobSpecError(
                f"{source}: [job] clients_per_round needs clients (the number of virtual "
                "clients to sample from); set clients, or drop clients_per_round"
            )
        return
    if spec.partitions and spec.partitions != spec.clients:
        raise JobSpecError(
            f"{source}: [job] partitions = {spec.partitions} but clients = {spec.clients}: each "
            "virtual client has its own partition; drop partitions"
        )
    if spec.clients_per_round > spec.clients:
        raise JobSpecError(
            f"{source}: [job] clients_per_round = {spec.clients_per_round} is more than clients "
            f"= {spec.clients}; lower it"
        )
    if spec.client_sampling == "poisson" and spec.min_workers != 1:
        raise JobSpecError(
            f'{source}: [job] client_sampling = "poisson" draws a varying number of clients, '
            f"as few as one, and min_workers = {spec.min_workers} could never be met then; set "
            "min_workers = 1"
        )
    if spec.sampled_clients < spec.min_workers:
        raise JobSpecError(
            f"{source}: [job] {spec.sampled_clients} clients a round can never make min_workers "
            f"= {spec.min_workers} updates; raise clients_per_round or lower min_workers"
        )


def _check_stragglers(source: str, train: TrainParams) -> None:
    if train.straggler_epochs and not train.stragglers:
        raise JobSpecError(
            f"{source}: [train] straggler_epochs is set but stragglers = 0; set stragglers (the "
            "share of clients that do less), or drop straggler_epochs"
        )
    if train.straggler_epochs and train.straggler_epochs[1] > train.local_epochs:
        raise JobSpecError(
            f"{source}: [train] straggler_epochs = {list(train.straggler_epochs)} goes above "
            f"local_epochs = {train.local_epochs}: a straggler does less; lower it"
        )


def _code_path(source: str, key: str, name: str, base_dir: Path | None) -> str:
    """A file reference made absolute; a relative one with no job file is refused."""
    if base_dir is not None:
        return absolute_reference(name, base_dir)
    if is_relative_file(name):  # relative: to what?
        raise JobSpecError(
            f"{source}: [job] {key} = {name!r} is a relative path with no job file to be "
            "relative to; give the file's absolute path"
        )
    return name


def _check_table(source: str, table: str, values: dict[str, Any], keys: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key not in keys:
            raise JobSpecError(f"{source}: [{table}] unknown key {key!r}{_suggest(key, keys)}")
        typ, check, hint = keys[key]
        try:
            value = coerce(value, typ)
        except TypeError:
            raise JobSpecError(
                f"{source}: [{table}] {key} must be {type_names(typ)}, got {value!r}; use {hint}"
            ) from None
        if not check(value):
            raise JobSpecError(f"{source}: [{table}] {key} = {value!r} is invalid; use {hint}")
        out[key] = value
    return out


def _suggest(word: str, options: Any) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    known = ", ".join(sorted(options))
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {known})"


def _sanitize_id(stem: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "-", stem).strip("-.") or "job"
    return cleaned[:128]
