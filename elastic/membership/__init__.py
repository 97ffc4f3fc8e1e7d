"""Membership: who the workers are, who leads, which jobs exist; kept by a cluster
backend (``cluster.ClusterBackend``) chosen by the URL's scheme."""

from elastic.membership.base import Member, MembershipEvent, MemberTable
from elastic.membership.cluster import (
    ClusterBackend,
    Election,
    JobStore,
    LeaderRecord,
    Registration,
)

__all__ = [
    "ClusterBackend",
    "Election",
    "JobStore",
    "LeaderRecord",
    "Member",
    "MemberTable",
    "MembershipEvent",
    "Registration",
]
