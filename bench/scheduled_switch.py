"""How many seconds after its time a scheduled switch starts, against an admin pressing Switch now at that
second: the same switch, the same machine, the same run.

Seeds a lab in a temporary directory; each round fails back a small one-disk VM (no guest tools) twice:
once Switch now pressed by a timer at a moment 3 s ahead (the peer: nothing could start sooner), once
scheduled for a whole second 6-7 s ahead (the portal refuses a moment under 5 s away), which queues the scheduled switch's task at once (the moment is nearer
than the schedule's lead) and lets it wait for the second, as the worker does. Steps run inline
(django-q2's sync mode), so the broker's pick-up is not in these figures; tests/test_faults.py checks with
a real cluster that the worker holds the task before the moment. The lateness is the switch's audit row
(written when the switch starts) minus the moment.

Usage: .venv/bin/python bench/scheduled_switch.py [--rounds 7]
Last line: scheduled_late_ms=<median> switch_now_late_ms=<median> scheduled_vs_switch_now=<ratio>
           scheduled_late_worst_ms=<max> early=<rounds that started before their moment>
"""

import argparse
import os
import random
import shutil
import statistics
import sys
import threading
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MiB = 2**20


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    from lab_setup import lab_portal

    var, lab, user = lab_portal("--count", "1", "--scale", "0.05")
    from django.core.management import call_command
    from django.utils import timezone

    from failback import workflow
    from failback.models import AuditEvent, FailbackSession, Replica

    vm_id = lab.create_vm(
        "sched-01_replica",
        host="esx-dr-01",
        datastore="dr-ds-01",
        disks=[16 * MiB],
        networks=["dr-net"],
        power_on=True,
        tools_installed=False,
    )
    with open(lab.disk_path(vm_id, "scsi0:0"), "r+b") as disk:
        disk.write(random.Random(1).randbytes(4 * MiB))
    call_command("seed_lab", "--no-user", stdout=open(os.devnull, "w"))
    lab.set_vm_options(vm_id, workload=False)
    replica = Replica.objects.get(vm_id=vm_id)

    def ready():
        session = workflow.start_failback(
            user,
            replica.pk,
            vm_name="sched-01-prod",
            target_host="esx-prod-01",
            target_datastore="prod-ds-01",
            network_map={"dr-net": "prod-net"},
            switch_mode="manual",
            power_on_after=True,
        )
        assert FailbackSession.objects.get(pk=session.pk).status == "ready_to_switch"
        return session.pk

    def late_ms(session_id, moment):
        row = AuditEvent.objects.get(session_id=session_id, action="switch")
        assert FailbackSession.objects.get(pk=session_id).status == "failback"
        workflow.undo(user, session_id)
        return (row.at - moment).total_seconds() * 1000

    scheduled, pressed = [], []
    for _ in range(args.rounds):
        session_id = ready()
        moment = timezone.now() + timedelta(seconds=3)
        timer = threading.Timer(
            (moment - timezone.now()).total_seconds(), lambda sid=session_id: workflow.switch_now(user, sid)
        )
        timer.start()
        timer.join()
        pressed.append(late_ms(session_id, moment))

        session_id = ready()
        moment = (timezone.now() + timedelta(seconds=6)).replace(microsecond=0) + timedelta(seconds=1)
        workflow.schedule_switch(user, session_id, moment)  # queued at once: inline, it waits for the second
        scheduled.append(late_ms(session_id, moment))
        print(f"switch now {pressed[-1]:8.1f} ms   scheduled {scheduled[-1]:8.1f} ms after the moment")

    s, p = statistics.median(scheduled), statistics.median(pressed)
    shutil.rmtree(var, ignore_errors=True)
    print(
        f"scheduled_late_ms={s:.1f} switch_now_late_ms={p:.1f} scheduled_vs_switch_now={s / p:.2f} "
        f"scheduled_late_worst_ms={max(scheduled):.1f} early={sum(x < 0 for x in scheduled + pressed)}"
    )


if __name__ == "__main__":
    main()
