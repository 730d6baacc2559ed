"""Time a whole failback of the seeded lab's largest replica, through the service layer; then the
switch window of a small and a large disk with the same change.

Seeds a fresh lab (scale 1, 12 replicas) in a temporary directory, starts a failback of the replica with
the most allocated data (manual switch, power on after), lets the lab workload write to it for a while
(users keep working during Ready to switch), presses Switch now and reports phase 1 against the switch
window (replica going down -> production on). Steps run inline, as django-q2's sync mode runs them.

Then two one-disk VMs, --small-gib and --large-gib (10 % allocated, guest tools, a 1 s guest shutdown), each
get the same change after phase 1 (--change-mib in 64 KiB writes at the same offsets, inside the small
disk) and are switched; for each the window is split into guest shutdown, final delta, verification,
the rest of the data part (the portal's own work: platform calls, rows) and power-on, measured beside
predicted (the prediction the page showed just before the switch). --no-sizes skips this part.

Usage: .venv/bin/python bench/lab_failback.py [--busy-seconds 10] [--rate 1.0] [--small-gib 1] [--large-gib 16]
       [--change-mib 4] [--no-sizes]
Before the switch it also reads the predicted switch window, as the page shows it.
Last line: phase1_s=<s> switch_window_s=<s> window_vs_phase1=<window/phase1> predicted_s=<s> predicted_vs_actual=<ratio> largest=<name> allocated_mib=<n>
  then, per size (small_, large_): <size>_window_s <size>_predicted_s <size>_shutdown_s <size>_delta_s
  <size>_verify_s <size>_other_s <size>_power_on_s, and large_vs_small_window=<large window/small window>
"""

import argparse
import os
import shutil
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--busy-seconds", type=float, default=10.0, help="workload time between phase 1 and the switch")
    parser.add_argument("--rate", type=float, default=1.0, help="MiB/s the workload writes to each running VM")
    parser.add_argument("--small-gib", type=float, default=1.0, help="capacity of the small disk")
    parser.add_argument("--large-gib", type=float, default=16.0, help="capacity of the large disk")
    parser.add_argument("--change-mib", type=int, default=4, help="the change made to both, in 64 KiB writes")
    parser.add_argument("--no-sizes", action="store_true", help="only the seeded lab's largest replica")
    args = parser.parse_args()

    from lab_setup import lab_portal

    started = time.monotonic()
    var, lab, user = lab_portal()
    print(f"migrated and seeded lab in {time.monotonic() - started:.1f} s under {var}")
    from django.conf import settings

    from failback import jobs, workflow
    from failback.hypervisors.lab_demo import run_workload
    from failback.models import FailbackSession, Replica

    def allocated(replica):
        total = 0
        for d in replica.disks.all():
            total += os.stat(lab.disk_path(replica.vm_id, d.key)).st_blocks * 512
        return total

    replica = max(Replica.objects.all(), key=allocated)
    alloc = allocated(replica)
    config = lab.vm_config(replica.vm_id)
    print(
        f"largest: {replica.name}, {len(config.disks)} disk(s), {sum(d.capacity_bytes for d in config.disks) / 2**30:.2f} GiB capacity, "
        f"{alloc / 2**20:.0f} MiB allocated, tools={config.tools_installed}, shutdown_seconds={lab.vm_meta(replica.vm_id)['shutdown_seconds']}"
    )
    lab.set_vm_options(replica.vm_id, shutdown_hangs=False)
    networks = {nic.network: nic.network.replace("dr-", "prod-") for nic in config.nics if nic.network}

    stop = threading.Event()
    writer = threading.Thread(
        target=run_workload, args=(settings.LAB_ROOT,), kwargs={"stop": stop, "mib_per_s": args.rate}, daemon=True
    )
    writer.start()
    session = workflow.start_failback(
        user,
        replica.pk,
        vm_name=f"{replica.source_name}-prod",
        target_host="esx-prod-01",
        target_datastore="prod-ds-01",
        network_map=networks,
        switch_mode="manual",
        power_on_after=True,
    )
    session = FailbackSession.objects.get(pk=session.pk)
    assert session.status == "ready_to_switch", (session.status, session.error)
    time.sleep(args.busy_seconds)
    stop.set()
    writer.join()
    predicted = jobs.run_readiness(session.pk, catch_up=False)["window_s"]
    workflow.switch_now(user, session.pk)
    session = FailbackSession.objects.get(pk=session.pk)
    assert session.status == "failback", (session.status, session.error)
    phase1 = session.phase1_duration.total_seconds()
    window = session.switch_window.total_seconds()
    stop_s = (session.replica_off_at - session.replica_stop_started_at).total_seconds()
    delta_s = (session.phase2_ended_at - session.replica_off_at).total_seconds()
    on_s = (session.production_on_at - session.phase2_ended_at).total_seconds()
    for d in session.disks.all():
        print(
            f"  disk {d.key}: phase 1 wrote {d.phase1_bytes_written / 2**20:.1f} MiB; phase 2 ({d.method}) wrote {d.phase2_bytes_written / 2**20:.2f} MiB; verified={d.verified}"
        )
    print(
        f"phase 1 {phase1:.2f} s; switch window {window:.2f} s = replica stop {stop_s:.2f} s ({session.stop_method}) "
        f"+ final delta and verify {delta_s:.2f} s + power on {on_s:.2f} s"
    )
    print(f"predicted before the switch: {predicted:.2f} s")
    line = (
        f"phase1_s={phase1:.2f} switch_window_s={window:.2f} window_vs_phase1={window / phase1:.3f} predicted_s={predicted:.2f} "
        f"predicted_vs_actual={predicted / window:.3f} largest={replica.name} allocated_mib={alloc / 2**20:.0f}"
    )
    if not args.no_sizes:
        sizes = {}
        for label, gib in (("small", args.small_gib), ("large", args.large_gib)):
            sizes[label] = one_disk_switch(
                lab, user, label, int(gib * 2**30), args.change_mib << 20, int(args.small_gib * 2**30)
            )
        for label, f in sizes.items():
            line += " " + " ".join(f"{label}_{k}={f[k]:.3f}" for k in FIGURES)
        line += f" large_vs_small_window={sizes['large']['window_s'] / sizes['small']['window_s']:.3f}"
    shutil.rmtree(var, ignore_errors=True)
    print(line)


FIGURES = ("window_s", "predicted_s", "shutdown_s", "delta_s", "verify_s", "other_s", "power_on_s")


def one_disk_switch(lab, user, label, capacity, change_bytes, within):
    """A one-disk VM of ``capacity`` bytes (10 % allocated) failed back; after phase 1 the same change as
    the other size (``change_bytes`` in 64 KiB writes at offsets below ``within``), then the switch.
    The window's parts, measured and predicted."""
    import random

    from django.core.management import call_command

    from failback import jobs, workflow
    from failback.models import AuditEvent, FailbackSession, Replica

    name = f"bench-{label}"
    vm_id = lab.create_vm(
        f"{name}_replica",
        host="esx-dr-01",
        datastore="dr-ds-01",
        disks=[capacity],
        networks=["dr-net"],
        power_on=True,
        tools_installed=True,
        shutdown_seconds=1.0,
    )
    rng = random.Random(11)
    with open(lab.disk_path(vm_id, "scsi0:0"), "r+b") as disk:  # 10 % allocated: 1 MiB of data every 10 MiB
        for offset in range(0, capacity - (1 << 20) + 1, 10 << 20):
            disk.seek(offset)
            disk.write(rng.randbytes(1 << 20))
    call_command("seed_lab", "--no-user", stdout=open(os.devnull, "w"))
    replica = Replica.objects.get(vm_id=vm_id)
    session = workflow.start_failback(
        user,
        replica.pk,
        vm_name=f"{name}-prod",
        target_host="esx-prod-01",
        target_datastore="prod-ds-01",
        network_map={"dr-net": "prod-net"},
        switch_mode="manual",
        power_on_after=True,
    )
    session = FailbackSession.objects.get(pk=session.pk)
    assert session.status == "ready_to_switch", (session.status, session.error)
    same = random.Random(7)  # the same offsets and bytes on both sizes
    for _ in range(change_bytes // (64 << 10)):
        lab.guest_write(
            vm_id, "scsi0:0", same.randrange(0, within // (64 << 10)) * (64 << 10), same.randbytes(64 << 10)
        )
    forecast = jobs.run_readiness(session.pk, catch_up=False)
    workflow.switch_now(user, session.pk)
    session = FailbackSession.objects.get(pk=session.pk)
    assert session.status == "failback", (session.status, session.error)
    sent = AuditEvent.objects.get(session=session, action="send_changes").data
    data_s = (session.phase2_ended_at - session.replica_off_at).total_seconds()
    f = {
        "window_s": session.switch_window.total_seconds(),
        "predicted_s": forecast["window_s"],
        "shutdown_s": (session.replica_off_at - session.replica_stop_started_at).total_seconds(),
        "delta_s": sent["seconds"],
        "verify_s": sent["proof"]["seconds"],
        "power_on_s": (session.production_on_at - session.phase2_ended_at).total_seconds(),
    }
    f["other_s"] = max(0.0, data_s - f["delta_s"] - f["verify_s"])
    print(
        f"{label} disk {capacity / 2**30:.2f} GiB, {_mib(change_bytes)} MiB changed ({sent['method']}, "
        f"{_mib(sent['bytes_written'])} MiB written):\n"
        f"  measured  window {f['window_s']:.2f} s = shutdown {f['shutdown_s']:.2f} + delta {f['delta_s']:.3f} "
        f"+ verification {f['verify_s']:.3f} + other {f['other_s']:.3f} + power-on {f['power_on_s']:.2f}\n"
        f"  predicted window {forecast['window_s']:.2f} s = shutdown {forecast['shutdown_s']:.2f} + data (delta and verification) "
        f"{forecast['data_s']:.2f} + power-on {forecast['power_on_s']:.2f}"
    )
    return f


def _mib(n):
    return f"{n / 2**20:.1f}"


if __name__ == "__main__":
    main()
