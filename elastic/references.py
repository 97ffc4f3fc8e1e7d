"""Tasks and rules by import path: a job names a class where no plugin is installed.

A job spec's ``task`` or ``rule`` is a plugin's name (``"digits"``), or a reference to
a class:

* ``"my_tasks:CifarTask"``: module ``my_tasks`` from this Python's import path (an
  installed package, or a directory on ``PYTHONPATH``);
* ``"./my_task.py:CifarTask"``: a file. A relative path is relative to the job file;
  ``load_job_spec`` makes it absolute, so the spec names one path wherever it goes.

Code never travels: the coordinator, ``elastic validate`` and each worker load the
class from their own filesystem or packages. A process that cannot gets a
``PluginError`` naming the reference, the host and the fix; a worker answers its
WORK with it (NACK ``task_unavailable``) and sits the job out.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import socket
import sys
from pathlib import Path
from types import ModuleType

from elastic.errors import PluginError

__all__ = ["is_reference", "is_relative_file", "absolute_reference", "load_class"]

# A file loaded once per process (by path and modification time): one class object
# per job, whoever asks for it.
_loaded: dict[tuple[str, int], ModuleType] = {}


def is_reference(name: str) -> bool:
    """Whether ``name`` names a class by import path (else: a plugin's name)."""
    return ":" in name


def _is_file(module: str) -> bool:
    return module.endswith(".py") or "/" in module or "\\" in module


def _split(kind: str, ref: str) -> tuple[str, str]:
    module, _, attr = ref.rpartition(":")
    if not module or not attr.isidentifier():
        raise PluginError(
            f"{kind} {ref!r} is not a class reference; use MODULE:CLASS (e.g. "
            f'"my_tasks:CifarTask") or PATH.py:CLASS (e.g. "./my_task.py:CifarTask")'
        )
    return module, attr


def is_relative_file(ref: str) -> bool:
    """Whether ``ref`` names a class in a file by a relative path."""
    module = ref.rpartition(":")[0]
    return is_reference(ref) and _is_file(module) and not Path(module).expanduser().is_absolute()


def absolute_reference(ref: str, base_dir: Path) -> str:
    """``ref`` with a relative file path made absolute against ``base_dir`` (the job
    file's directory); module references and plugin names are returned unchanged."""
    if not is_relative_file(ref):
        return ref
    module, _, attr = ref.rpartition(":")
    return f"{(base_dir / module).resolve()}:{attr}"


def load_class(kind: str, ref: str, base: type) -> type:
    """The class ``ref`` names, checked to extend ``base``; ``PluginError`` naming the
    reference, this host and the fix when it cannot be had."""
    module_name, attr = _split(kind, ref)
    where = f"cannot load {kind} {ref!r} on {socket.gethostname()}"
    load = _load_file if _is_file(module_name) else _import
    module = load(where, module_name)
    cls = getattr(module, attr, None)
    if cls is None:
        raise PluginError(f"{where}: {module_name} has no {attr!r}; check the class name")
    if not isinstance(cls, type) or not issubclass(cls, base):
        raise PluginError(
            f"{where}: {attr} does not extend {base.__name__}; define it as "
            f"`class {attr}({base.__name__})` (from elastic.api import {base.__name__})"
        )
    return cls


def _import(where: str, name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and name.startswith(exc.name):  # the module itself is missing
            raise PluginError(
                f"{where}: no module {name!r} on this Python's import path; install it, "
                "or put its directory on PYTHONPATH"
            ) from None
        raise _failed(where, name, exc) from exc
    except Exception as exc:
        raise _failed(where, name, exc) from exc


def _load_file(where: str, path_text: str) -> ModuleType:
    path = Path(path_text).expanduser()
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        raise PluginError(
            f"{where}: {path} does not exist here; put the file at that path on every host "
            "that runs the job (or install it and name it MODULE:CLASS)"
        ) from None
    key = (str(path.resolve()), stamp)
    if key in _loaded:
        return _loaded[key]
    # A name of its own per file, so two jobs' my_task.py never collide.
    digest = hashlib.sha1(key[0].encode()).hexdigest()[:10]
    name = f"elastic_user_{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"{where}: {path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # (dataclasses and pickling look their module up)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise _failed(where, str(path), exc) from exc
    _loaded[key] = module
    return module


def _failed(where: str, what: str, exc: Exception) -> PluginError:
    return PluginError(f"{where}: {what} failed to import: {type(exc).__name__}: {exc}")
