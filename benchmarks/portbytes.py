"""Bytes through a TCP port on loopback, counted by the kernel (iptables): the same
measure for any framework, headers and framing included.

Two accounting rules in INPUT (every loopback packet passes it once): to the port
and from it. Root only; ``PortBytes.available()`` says whether it can count here.
"""

from __future__ import annotations

import shutil
import subprocess

__all__ = ["PortBytes"]


class PortBytes:
    """Counts the bytes to and from ``port`` while open (a context manager)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.rules = [["-p", "tcp", "--dport", str(port)], ["-p", "tcp", "--sport", str(port)]]

    @staticmethod
    def available() -> bool:
        if shutil.which("iptables") is None:
            return False
        return (
            subprocess.run(["iptables", "-L", "INPUT", "-n"], capture_output=True).returncode == 0
        )

    def __enter__(self) -> PortBytes:
        for rule in self.rules:
            subprocess.run(["iptables", "-I", "INPUT", *rule], check=True)
        return self

    def __exit__(self, *exc: object) -> None:
        for rule in self.rules:
            subprocess.run(["iptables", "-D", "INPUT", *rule], check=False)

    def total(self) -> int:
        """Bytes both ways so far."""
        listing = subprocess.run(
            ["iptables", "-L", "INPUT", "-v", "-x", "-n"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        total = 0
        for line in listing.splitlines():
            fields = line.split()
            if (
                len(fields) > 2
                and fields[0].isdigit()
                and (f"dpt:{self.port}" in line or f"spt:{self.port}" in line)
            ):
                total += int(fields[1])
        return total
