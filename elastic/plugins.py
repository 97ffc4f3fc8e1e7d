"""The plugin manager: entry points in, name -> class registries out.

Built-ins load exactly as third-party plugins do, from the entry-point group
``elastic``. Everything is checked at load time: a plugin that fails to import, a
contributed class of the wrong kind, or a name given twice is a ``PluginError``
naming the distribution, before any job runs.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

import pluggy

from elastic import hookspecs
from elastic.compression.codec import Codec
from elastic.errors import PluginError
from elastic.jobspec import JobSpec
from elastic.membership.cluster import ClusterBackend
from elastic.privacy import PrivacyMechanism
from elastic.references import is_reference, load_class
from elastic.rules import Aggregator
from elastic.tasks import Task

__all__ = ["Plugins", "Registry", "Provided"]

log = logging.getLogger("elastic.plugins")
T = TypeVar("T")

# hook name -> (kind in messages, the base class contributed classes must extend)
COMPONENT_HOOKS: dict[str, tuple[str, type]] = {
    "elastic_aggregators": ("aggregator", Aggregator),
    "elastic_tasks": ("task", Task),
    "elastic_codecs": ("codec", Codec),
    "elastic_cluster_backends": ("cluster backend", ClusterBackend),
    "elastic_privacy_mechanisms": ("privacy mechanism", PrivacyMechanism),
}


@dataclass(frozen=True)
class Provided:
    """One contributed class and where it came from."""

    kind: str
    name: str
    cls: type
    plugin: str
    distribution: str


class Registry(Generic[T]):
    """Classes of one kind by name. Unknown names fail with the list of known ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Provided] = {}

    def add(self, item: Provided) -> None:
        other = self._items.get(item.name)
        if other is not None:
            raise PluginError(
                f"{self.kind} {item.name!r} is provided twice: by {other.distribution} "
                f"({other.plugin}) and by {item.distribution} ({item.plugin}); "
                "uninstall one of them"
            )
        self._items[item.name] = item

    def get(self, name: str) -> type[T]:
        item = self._items.get(name)
        if item is None:
            known = ", ".join(sorted(self._items)) or "none installed"
            raise PluginError(
                f"unknown {self.kind} {name!r} (known: {known}); "
                "check the spelling or install the plugin that provides it"
            )
        return item.cls

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> list[Provided]:
        return [self._items[n] for n in self.names()]


class Plugins:
    """Loads plugins and exposes the registries and the event hooks.

    Args:
        entrypoints: load the ``elastic`` entry-point group (turn off in tests that
            register plugins by hand).
        extra: plugin objects to register too (e.g. a progress-bar observer).
    """

    def __init__(self, entrypoints: bool = True, extra: Iterable[object] = ()) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self._dist: dict[str, str] = {}
        if entrypoints:
            self._load_entrypoints()
        for i, plugin in enumerate(extra):
            self.register(
                plugin, name=f"extra-{i}-{getattr(plugin, '__name__', type(plugin).__name__)}"
            )
        self.aggregators: Registry[Aggregator] = Registry("aggregator")
        self.tasks: Registry[Task] = Registry("task")
        self.codecs: Registry[Codec] = Registry("codec")
        self.backends: Registry[ClusterBackend] = Registry("cluster backend")
        self.privacy: Registry[PrivacyMechanism] = Registry("privacy mechanism")
        self._build_registries()

    def register(
        self, plugin: object, name: str, distribution: str = "(registered in code)"
    ) -> None:
        try:
            self.pm.register(plugin, name=name)
        except (ValueError, pluggy.PluginValidationError) as exc:
            raise PluginError(f"plugin {name!r} from {distribution} is invalid: {exc}") from exc
        self._dist[name] = distribution

    def _load_entrypoints(self) -> None:
        for ep in entry_points(group=hookspecs.PROJECT):
            dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist else "an unknown distribution"
            try:
                module = ep.load()
            except Exception as exc:
                raise PluginError(
                    f"plugin {ep.name!r} ({ep.value}) from {dist} failed to import: "
                    f"{type(exc).__name__}: {exc}; fix or uninstall that distribution"
                ) from exc
            if self.pm.is_registered(module):
                continue  # one module may serve several entry points
            self.register(module, name=ep.name, distribution=dist)

    def _build_registries(self) -> None:
        registries: dict[str, Registry[Any]] = {
            "elastic_aggregators": self.aggregators,
            "elastic_tasks": self.tasks,
            "elastic_codecs": self.codecs,
            "elastic_cluster_backends": self.backends,
            "elastic_privacy_mechanisms": self.privacy,
        }
        for hook_name, (kind, base) in COMPONENT_HOOKS.items():
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                dist = self._dist.get(impl.plugin_name, "(unknown)")
                try:
                    contributed = impl.function()
                except Exception as exc:
                    raise PluginError(
                        f"plugin {impl.plugin_name!r} from {dist} failed in {hook_name}: {exc}"
                    ) from exc
                if not isinstance(contributed, list | tuple):
                    raise PluginError(
                        f"plugin {impl.plugin_name!r} from {dist}: {hook_name} must return a list "
                        "of classes (each one's `name` is its key), not "
                        f"{type(contributed).__name__}"
                    )
                for cls in contributed:
                    _check_class(kind, base, cls, impl.plugin_name, dist)
                    registries[hook_name].add(Provided(kind, cls.name, cls, impl.plugin_name, dist))

    def task(self, name: str) -> type[Task]:
        """The task class a job names: an installed plugin's, or a class by import
        path (``"my_tasks:CifarTask"``, ``"/abs/my_task.py:CifarTask"``:
        ``elastic.references``)."""
        return load_class("task", name, Task) if is_reference(name) else self.tasks.get(name)

    def rule(self, name: str) -> type[Aggregator]:
        """The aggregation rule class a job names, as ``task`` does for tasks."""
        if is_reference(name):
            return load_class("rule", name, Aggregator)
        return self.aggregators.get(name)

    def protected(
        self, spec: JobSpec, rule: Aggregator
    ) -> tuple[Aggregator, PrivacyMechanism | None]:
        """The rule a job runs: ``rule`` wrapped by the job's privacy mechanism
        (``[privacy]``), and the mechanism; the rule itself when there is none."""
        if not spec.privacy:
            return rule, None
        params = dict(spec.privacy)
        mechanism = self.privacy.get(params.pop("mechanism"))(params, spec)
        return mechanism.wrap(rule), mechanism

    def provided(self) -> list[Provided]:
        """Everything contributed, for ``elastic plugins``."""
        out: list[Provided] = []
        for reg in (self.aggregators, self.tasks, self.codecs, self.backends, self.privacy):
            out.extend(reg.items())
        return out

    def observers(self) -> list[tuple[str, str]]:
        """(plugin, distribution) of every plugin that implements an event hook."""
        seen: dict[str, str] = {}
        for hook_name in dir(self.pm.hook):
            if hook_name.startswith("elastic_") and hook_name not in COMPONENT_HOOKS:
                for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                    seen[impl.plugin_name] = self._dist.get(impl.plugin_name, "(unknown)")
        return sorted(seen.items())

    def implements(self, hook_name: str) -> bool:
        """Whether any plugin implements ``hook_name``."""
        return bool(getattr(self.pm.hook, hook_name).get_hookimpls())

    def first_answer(self, hook_name: str, **kwargs: Any) -> tuple[str, Any] | None:
        """(plugin, answer) of the first implementation of a ``firstresult`` hook that
        gives one (not None), in pluggy's calling order; one that raises answers with
        its exception (a failing validator must not let everything through)."""
        hook = getattr(self.pm.hook, hook_name)
        if not hook.spec.opts.get("firstresult"):
            raise PluginError(
                f"{hook_name} is not a firstresult hook; notify() calls every implementation"
            )
        for impl in reversed(hook.get_hookimpls()):  # pluggy calls the last registered first
            try:
                answer = impl.function(**{a: kwargs[a] for a in impl.argnames})
            except Exception as exc:
                log.exception("plugin failed plugin=%s hook=%s", impl.plugin_name, hook_name)
                answer = exc
            if answer is not None:
                return impl.plugin_name, answer
        return None

    def notify(self, hook_name: str, **kwargs: Any) -> None:
        """Call every implementation of an event hook, each isolated from the others."""
        hook = getattr(self.pm.hook, hook_name)
        for impl in hook.get_hookimpls():
            try:
                impl.function(**{a: kwargs[a] for a in impl.argnames})
            except Exception:
                log.exception(
                    "observer plugin failed plugin=%s hook=%s", impl.plugin_name, hook_name
                )


def _check_class(kind: str, base: type, cls: Any, plugin: str, dist: str) -> None:
    where = f"plugin {plugin!r} from {dist}"
    if not (inspect.isclass(cls) and issubclass(cls, base)):
        raise PluginError(f"{where}: {kind} {cls!r} must be a subclass of {base.__qualname__}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise PluginError(
            f"{where}: {kind} {cls.__qualname__} has no `name` (a non-empty string class "
            f"attribute, its key), got {name!r}"
        )
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(getattr(cls, "__abstractmethods__", ())))
        raise PluginError(
            f"{where}: {kind} {name!r} ({cls.__qualname__}) leaves abstract: {missing}"
        )
