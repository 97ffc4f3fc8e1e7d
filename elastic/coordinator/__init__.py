"""The coordinator: jobs, rounds, checkpoints, and the daemon loop that drives them."""

from elastic.coordinator.daemon import Coordinator
from elastic.coordinator.job import Job, JobState
from elastic.coordinator.rounds import RoundEngine

__all__ = ["Coordinator", "Job", "JobState", "RoundEngine"]
