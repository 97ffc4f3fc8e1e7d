"""The worker: a daemon that joins a coordinator and trains what it is sent."""

from elastic.worker.daemon import Worker

__all__ = ["Worker"]
