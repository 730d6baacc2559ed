"""Time a whole failback of the seeded lab's largest replica, through the service layer.

Seeds a fresh lab (scale 1, 12 replicas) in a temporary directory, starts a failback of the replica with
the most allocated data (manual switch, power on after), lets the lab workload write to it for a while
(users keep working during Ready to switch), presses Switch now and reports phase 1 against the switch
window (replica going down -> production on). Steps run inline, as django-q2's sync mode runs them.

Usage: .venv/bin/python bench/lab_failback.py [--busy-seconds 10] [--rate 1.0]
Before the switch it also reads the predicted switch window, as the page shows it.
Last line: phase1_s=<s> switch_window_s=<s> window_vs_phase1=<window/phase1> predicted_s=<s> predicted_vs_actual=<ratio> largest=<name> allocated_mib=<n>
"""

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--busy-seconds", type=float, default=10.0, help="workload time between phase 1 and the switch")
    parser.add_argument("--rate", type=float, default=1.0, help="MiB/s the workload writes to each running VM")
    args = parser.parse_args()

    var = tempfile.mkdtemp(prefix="dr-bench-", dir=ROOT / "var" if (ROOT / "var").exists() else None)
    os.environ.update({"DR_PORTAL_VAR": var, "DJANGO_SETTINGS_MODULE": "dr_portal.settings", "LOG_LEVEL": "WARNING"})
    os.environ.pop("DATABASE_URL", None)
    os.environ.pop("REDIS_URL", None)
    import django

    django.setup()
    from django.conf import settings
    from django.contrib.auth.models import Group, User
    from django.core.management import call_command
    from django_q.conf import Conf

    from failback import jobs, workflow
    from failback.hypervisors.lab import LabHypervisor
    from failback.hypervisors.lab_demo import run_workload
    from failback.models import FailbackSession, Replica

    Conf.SYNC = True
    call_command("migrate", verbosity=0)
    call_command("migrate", database="channels", verbosity=0)
    started = time.monotonic()
    call_command("seed_lab", "--no-user", stdout=open(os.devnull, "w"))
    print(f"seeded lab in {time.monotonic() - started:.1f} s under {var}")
    lab = LabHypervisor(settings.LAB_ROOT)
    user = User.objects.create_user("bench")
    user.groups.add(Group.objects.get(name="Operator"))

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
    shutil.rmtree(var, ignore_errors=True)
    print(f"predicted before the switch: {predicted:.2f} s")
    print(
        f"phase1_s={phase1:.2f} switch_window_s={window:.2f} window_vs_phase1={window / phase1:.3f} predicted_s={predicted:.2f} "
        f"predicted_vs_actual={predicted / window:.3f} largest={replica.name} allocated_mib={alloc / 2**20:.0f}"
    )


if __name__ == "__main__":
    main()
