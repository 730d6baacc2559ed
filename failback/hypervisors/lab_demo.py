"""The demo lab, its workload generator and the lab's command line, on ``LabHypervisor``'s public methods.

``seed_demo`` creates the two-site demo lab the portal starts with (``manage.py seed_lab``);
``run_workload`` keeps writing to its running VMs like their users would (``manage.py lab_workload``).
From a shell::

    python -m failback.hypervisors.lab_demo seed var/lab
    python -m failback.hypervisors.lab_demo workload var/lab --mib-per-s 0.5
    python -m failback.hypervisors.lab_demo show var/lab

No Django here: the standard library only.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Sequence

from .base import POWERED_ON, HypervisorError
from .lab import LabHypervisor

KiB, MiB, GiB = 1024, 1024**2, 1024**3

DEMO_WORKLOADS = [  # name, guest OS, firmware, networks
    ("app-erp-01", "windows2019srv_64Guest", "efi", ("dr-net",)),
    ("db-sql-01", "windows2019srv_64Guest", "efi", ("dr-net",)),
    ("web-01", "ubuntu64Guest", "bios", ("dr-dmz",)),
    ("app-crm-01", "rhel8_64Guest", "efi", ("dr-net", "dr-dmz")),
    ("db-pg-01", "rhel8_64Guest", "efi", ("dr-net",)),
    ("web-02", "ubuntu64Guest", "bios", ("dr-dmz",)),
    ("file-01", "windows2019srv_64Guest", "efi", ("dr-net",)),
    ("mail-01", "windows2019srv_64Guest", "efi", ("dr-net", "dr-dmz")),
    ("app-hr-01", "rhel8_64Guest", "efi", ("dr-net",)),
    ("db-ora-01", "oracleLinux8_64Guest", "efi", ("dr-net",)),
    ("ad-dc-01", "windows2019srv_64Guest", "efi", ("dr-net",)),
    ("app-bi-01", "ubuntu64Guest", "efi", ("dr-net",)),
]
_DEMO_CAPACITIES_MIB = [256] * 5 + [384] * 4 + [512] * 3 + [768] * 2 + [1024, 2048, 3072]
DEMO_DATA_BUDGET = int(1.25 * GiB)  # allocated data across the whole lab at scale=1


def _round_down(n: int, unit: int) -> int:
    return n // unit * unit


# -- the demo lab ---------------------------------------------------------------------


def seed_demo(root: str | os.PathLike[str], *, count: int = 12, scale: float = 1.0, seed: int = 1) -> list[str]:
    """Create the two-site demo lab in ``root`` and return the ids of its ``count`` replica VMs.

    Production: hosts esx-prod-01/02, datastores prod-ds-01/02 (200 GiB x scale each), networks
    prod-net/prod-dmz. DR: hosts esx-dr-01/02, datastore dr-ds-01 (400 GiB x scale), networks
    dr-net/dr-dmz. Replicas ``<workload>_replica`` run on the DR hosts, powered on with the workload
    flag; every 4th has no tools, the 2nd hangs on guest shutdown, the 3rd has change tracking off.
    Each has 1-3 disks of 256 MiB-3 GiB (x scale); 10-30 % of each disk holds random data in
    scattered 1-4 MiB extents (x scale), scaled down uniformly if the lab would exceed 1.25 GiB
    x scale. Seed data is written directly and the change logs start empty. Deterministic for a seed.

    Idempotent: on a root this function seeded before it is a no-op returning the same ids. A root
    that holds anything else is refused (HypervisorError); so is a half-seeded one (delete it).
    """
    if count < 1 or scale <= 0:
        raise ValueError("count must be >= 1 and scale > 0")
    rng = random.Random(seed)
    lab = LabHypervisor(root)
    with lab.exclusive():  # another process seeding the same root waits, then finds it seeded
        done = lab.seeded()
        if done:
            return list(done["replicas"])
        inv = lab.inventory()
        if inv.hosts or inv.datastores or inv.networks or inv.vms:
            raise HypervisorError(f"Refusing to seed {lab.root}: it already holds a lab that seed_demo did not create.")
        _build_sites(lab, scale)
        plans = _plan_replicas(rng, count, scale)
        # The data budget applies across the whole lab, so every VM is planned before any is written.
        wanted = sum(c * f for p in plans for c, f in zip(p["disks"], p["fractions"], strict=True))
        factor = min(1.0, DEMO_DATA_BUDGET * scale / wanted)
        ids = [_create_replica(lab, p, factor, scale, rng) for p in plans]
        lab.mark_seeded({"seed": seed, "count": count, "scale": scale, "replicas": ids})
        return ids


def _build_sites(lab: LabHypervisor, scale: float) -> None:
    for h in ("esx-prod-01", "esx-prod-02", "esx-dr-01", "esx-dr-02"):
        lab.add_host(h)
    for ds, cap in (("prod-ds-01", 200 * GiB), ("prod-ds-02", 200 * GiB), ("dr-ds-01", 400 * GiB)):
        lab.add_datastore(ds, max(_round_down(int(cap * scale), 64 * KiB), GiB))
    for n in ("prod-net", "prod-dmz", "dr-net", "dr-dmz"):
        lab.add_network(n)


def _plan_replicas(rng: random.Random, count: int, scale: float) -> list[dict]:
    plans = []
    for i in range(count):
        if i < len(DEMO_WORKLOADS):
            workload, guest_os, firmware, nets = DEMO_WORKLOADS[i]
        else:
            workload, guest_os, firmware, nets = f"app-{i + 1:02d}", "ubuntu64Guest", "efi", ("dr-net",)
        disks = [
            max(_round_down(int(rng.choice(_DEMO_CAPACITIES_MIB) * MiB * scale), 64 * KiB), MiB)
            for _ in range(rng.choice([1, 1, 2, 2, 3]))
        ]
        plans.append(
            {
                "name": f"{workload}_replica",
                "guest_os": guest_os,
                "firmware": firmware,
                "networks": nets,
                "host": ("esx-dr-01", "esx-dr-02")[i % 2],
                "disks": disks,
                "fractions": [rng.uniform(0.10, 0.30) for _ in disks],
                "cpus": rng.choice([2, 2, 4, 4, 8]),
                "memory_mb": rng.choice([2048, 4096, 8192, 16384]),
                "tools": i % 4 != 3,
                "hangs": i == 1,
                "cbt": i != 2,
                "shutdown_seconds": float(rng.randint(2, 10)),
            }
        )
    return plans


def _create_replica(lab: LabHypervisor, p: dict, factor: float, scale: float, rng: random.Random) -> str:
    vm_id = lab.create_vm(
        p["name"],
        host=p["host"],
        datastore="dr-ds-01",
        disks=p["disks"],
        networks=p["networks"],
        cpus=p["cpus"],
        memory_mb=p["memory_mb"],
        guest_os=p["guest_os"],
        firmware=p["firmware"],
        tools_installed=p["tools"],
        shutdown_seconds=p["shutdown_seconds"],
        shutdown_hangs=p["hangs"],
        workload=True,
        cbt=p["cbt"],
        power_on=True,
    )
    for disk, frac in zip(lab.vm_config(vm_id).disks, p["fractions"], strict=True):
        _seed_disk(lab.disk_path(vm_id, disk.key), disk.capacity_bytes, frac * factor, scale, rng)
    lab.reset_change_tracking(vm_id)  # seed data is not a change
    return vm_id


def _seed_disk(path: str | os.PathLike[str], capacity: int, fraction: float, scale: float, rng: random.Random) -> None:
    """Write random data in scattered extents covering about ``fraction`` of the disk."""
    page = 4 * KiB
    slot = max(_round_down(int(4 * MiB * scale), page), 64 * KiB)
    slots = capacity // slot
    if slots == 0:
        return
    target = int(capacity * fraction)
    order = rng.sample(range(slots), slots)
    written = 0
    with open(path, "r+b") as f:
        for s in order:
            if written >= target:
                break
            size = min(slot, max(_round_down(int(rng.uniform(1, 4) * MiB * scale), page), page))
            offset = s * slot + _round_down(rng.randrange(0, slot - size + 1), page)
            f.seek(offset)
            f.write(rng.randbytes(size))
            written += size


# -- the workload generator -------------------------------------------------------------


def _workload_disks(lab: LabHypervisor) -> dict[str, list[tuple[str, int]]]:
    """Powered-on VMs with the workload flag and at least one disk: vm id -> [(disk key, capacity)]."""
    states = lab.power_states()
    out = {}
    for vm in lab.inventory().vms:
        if states.get(vm.vm_id) != POWERED_ON or not vm.disks:
            continue
        try:
            if lab.vm_meta(vm.vm_id)["workload"]:
                out[vm.vm_id] = [(d.key, d.capacity_bytes) for d in vm.disks]
        except HypervisorError:  # deleted meanwhile
            pass
    return out


def run_workload(
    root: str | os.PathLike[str],
    *,
    stop: threading.Event,
    mib_per_s: float = 1.0,
    block: tuple[int, int] = (64 * KiB, 1 * MiB),
    seed: int | None = None,
    refresh_seconds: float = 1.0,
) -> dict[str, int]:
    """Write random data through ``guest_write`` to every powered-on VM with the workload flag, at
    about ``mib_per_s`` per VM, in 4 KiB-aligned writes of ``block`` (min, max) bytes, until ``stop``
    is set. VMs are re-listed every ``refresh_seconds``; one powered off or deleted meanwhile is
    skipped. Returns bytes written per VM id.
    """
    if mib_per_s <= 0:
        raise ValueError("mib_per_s must be positive")
    rng = random.Random(seed)
    lab = LabHypervisor(root)
    rate = mib_per_s * MiB
    lo, hi = max(4 * KiB, block[0]), max(4 * KiB, block[1], block[0])
    disks: dict[str, list[tuple[str, int]]] = {}
    due: dict[str, float] = {}  # vm id -> when its next write is due (time.monotonic)
    written: dict[str, int] = {}
    next_refresh = 0.0
    while not stop.is_set():
        now = time.monotonic()
        if now >= next_refresh:
            disks = _workload_disks(lab)
            due = {vm_id: due[vm_id] if vm_id in due else now + rng.uniform(0, 0.05) for vm_id in disks}
            next_refresh = now + refresh_seconds
        if not due:
            stop.wait(max(0.0, min(0.2, next_refresh - now)))
            continue
        vm_id, when = min(due.items(), key=lambda kv: kv[1])
        if when > now:
            stop.wait(min(when, next_refresh) - now)
            continue
        key, cap = rng.choice(disks[vm_id])
        size = min(_round_down(rng.randint(lo, hi), 4 * KiB), _round_down(cap, 4 * KiB)) or min(cap, 4 * KiB)
        offset = _round_down(rng.randrange(0, cap - size + 1), 4 * KiB)
        try:
            lab.guest_write(vm_id, key, offset, rng.randbytes(size))
        except HypervisorError:  # powered off, suspended or deleted since the last listing
            del due[vm_id]
            continue
        written[vm_id] = written.get(vm_id, 0) + size
        due[vm_id] = max(when, now - 1.0) + size / rate  # no catch-up bursts after a stall
    return written


# -- command line -----------------------------------------------------------------------


def _show(lab: LabHypervisor) -> None:
    inv = lab.inventory()
    for ds, free in inv.datastores.items():
        print(f"datastore {ds}: {free / GiB:.1f} GiB free")
    for vm in inv.vms:
        meta = lab.vm_meta(vm.vm_id)
        disks = ", ".join(f"{d.key} {d.capacity_bytes / MiB:.0f} MiB" for d in vm.disks)
        print(
            f"{vm.vm_id:7} {vm.name:22} {vm.host:12} {meta['power_state']:11} "
            f"tools={'yes' if vm.tools_installed else 'no'} cbt={'on' if meta['cbt'] else 'off'} [{disks}]"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m failback.hypervisors.lab_demo", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("seed", help="create the two-site demo lab")
    p.add_argument("root")
    p.add_argument("--count", type=int, default=12)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1)
    p = sub.add_parser("workload", help="write to powered-on workload VMs until interrupted")
    p.add_argument("root")
    p.add_argument("--mib-per-s", type=float, default=1.0, help="per VM (default 1)")
    p.add_argument("--seed", type=int, default=None)
    p = sub.add_parser("show", help="print the lab's VMs")
    p.add_argument("root")
    args = parser.parse_args(argv)

    if args.command == "seed":
        t = time.monotonic()
        ids = seed_demo(args.root, count=args.count, scale=args.scale, seed=args.seed)
        print(f"{len(ids)} replicas in {args.root} ({time.monotonic() - t:.1f} s): {' '.join(ids)}")
    elif args.command == "workload":
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        written = run_workload(args.root, stop=stop, mib_per_s=args.mib_per_s, seed=args.seed)
        print(f"wrote {sum(written.values()) / MiB:.1f} MiB to {len(written)} VMs")
    else:
        _show(LabHypervisor(args.root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
