"""Membership: who the workers are, and when they come and go."""

from elastic.membership.base import Member, MembershipBackend, MembershipEvent

__all__ = ["Member", "MembershipBackend", "MembershipEvent"]
