"""Where a run executes: this host's name and identity (machine, boot, pid namespace) and the
process, so that a run whose process died can be told from one that is still going."""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Mapping
from pathlib import Path


def host_name() -> str:
    """This host's name on runs: $CIFAR_HOST (a stable name for a GPU box, or several "hosts"
    on one machine), else the machine's hostname."""
    return os.environ.get("CIFAR_HOST") or socket.gethostname()


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


@functools.cache
def host_identity() -> dict[str, str]:
    """What a pid means something within: this machine (/etc/machine-id), this boot and this
    pid namespace. Two containers or boxes may share a host name; a rebooted box keeps its
    machine id but not one of its processes."""
    import hashlib

    def short(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()[:12] if text else ""

    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = ""
    return {
        "host_machine": short(_read("/etc/machine-id")),
        "host_boot": short(_read("/proc/sys/kernel/random/boot_id")),
        "host_pidns": short(pidns),
    }


def process_tags() -> dict[str, str]:
    """Where a run executes: host, worker (when a worker started it) and the process, so a run
    whose process died can be told from one that is still going."""
    import psutil

    me = psutil.Process()
    tags = {
        "host": host_name(),
        **host_identity(),
        "pid": str(me.pid),
        "pid_started": f"{me.create_time():.2f}",
    }
    if os.environ.get("CIFAR_WORKER_NAME"):
        tags["worker"] = os.environ["CIFAR_WORKER_NAME"]
    return tags


def process_gone(tags: Mapping[str, str]) -> bool:
    """True when the run's tags name a process of this host that no longer runs: this machine
    was rebooted since, or its pid is free or now belongs to a process started later. False
    when unknown, or when the pid belongs to another machine or pid namespace that happens to
    have this host name."""
    import psutil

    if tags.get("host") != host_name() or not tags.get("pid", "").isdigit():
        return False
    here = host_identity()  # (cached: fixed for the life of a process)
    if "host_boot" in tags:  # (runs recorded before these tags: judged by the pid alone)
        if tags["host_boot"] != here["host_boot"]:
            # Another boot: of this very machine (then every process of it is gone), or of
            # another machine with this name (not ours to judge).
            return bool(here["host_machine"]) and tags.get("host_machine") == here["host_machine"]
        if tags.get("host_pidns") != here["host_pidns"]:
            return False  # another container on this kernel
    try:
        proc = psutil.Process(int(tags["pid"]))
        started = float(tags.get("pid_started") or proc.create_time())
        return proc.status() == psutil.STATUS_ZOMBIE or abs(proc.create_time() - started) > 1.0
    except psutil.NoSuchProcess:
        return True
