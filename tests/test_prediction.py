"""The predicted switch window against measured switches on the lab (real disks, inline workers).

How close they come is measured in bench/lab_failback.py, not asserted here (no wall clock in tests).

Five failbacks of one seeded replica with different amounts of change written to it while it is
Ready to switch; before each switch the prediction shown to the admin is read, after it the window
users actually felt. Undo between rounds sends the workload back to the replica for the next one.
"""

import pytest
from django.core.management import call_command

from failback import jobs, workflow
from failback.choices import SessionStatus
from failback.models import AuditEvent, FailbackSession, Replica

from .helpers import replica_named, start

pytestmark = [pytest.mark.prediction, pytest.mark.django_db(databases="__all__", transaction=True)]

MiB = 2**20


@pytest.fixture
def bigger_lab(db, settings):
    import os

    from failback.hypervisors.lab import LabHypervisor

    call_command("seed_lab", "--count", "4", "--scale", "0.25", "--no-user", stdout=open(os.devnull, "w"))
    return LabHypervisor(settings.LAB_ROOT)


def write_changes(lab, replica, total):
    """The guest writes ``total`` bytes in 1 MiB pieces spread over its disks (through the lab, so change tracking sees them)."""
    disks = list(replica.disks.all())
    piece = b"\x6b" * MiB
    slots = [
        (disk, offset)
        for offset in range(0, max(d.capacity_bytes for d in disks), MiB)
        for disk in disks
        if offset + MiB <= disk.capacity_bytes
    ]
    assert total // MiB <= len(slots), "the replica's disks are too small for this much change"
    for disk, offset in slots[: total // MiB]:
        lab.guest_write(replica.vm_id, disk.key, offset, piece)


def test_the_predicted_window_is_shown_before_and_audited_beside_the_measured_one(bigger_lab, operator):
    lab = bigger_lab
    replica = max(Replica.objects.all(), key=lambda r: sum(d.capacity_bytes for d in r.disks.all()))
    lab.set_vm_options(
        replica.vm_id, tools_installed=True, shutdown_seconds=1.5, shutdown_hangs=False, cbt=True, workload=False
    )
    capacity_mib = sum(d.capacity_bytes for d in replica.disks.all()) // MiB
    rows = []
    for changed_mib in [int(capacity_mib * f) for f in (0, 0.1, 0.25, 0.5, 0.8)]:
        session = start(operator, replica)
        assert FailbackSession.objects.get(pk=session.pk).status == SessionStatus.READY_TO_SWITCH
        write_changes(lab, replica, changed_mib * MiB)
        forecast = jobs.run_readiness(session.pk, catch_up=False)  # what the scheduled refresh shows beside Switch now
        predicted = FailbackSession.objects.get(pk=session.pk).predicted_window_s
        assert predicted == forecast["window_s"] and forecast["changed_bytes"] >= changed_mib * MiB
        workflow.switch_now(operator, session.pk)
        session = FailbackSession.objects.get(pk=session.pk)
        assert session.status == SessionStatus.FAILBACK
        actual = session.switch_window.total_seconds()
        audited = AuditEvent.objects.get(session=session, action="switch_window")
        assert audited.data["shown_s"] == predicted and audited.data["predicted_s"] is not None
        rows.append((changed_mib, predicted, actual, audited.data["predicted_s"]))
        workflow.undo(operator, session.pk)
        assert FailbackSession.objects.get(pk=session.pk).status == SessionStatus.UNDONE
    print("\nchanged_mib predicted_s actual_s predicted_at_switch_s")
    for row in rows:
        print("%11d %11.2f %8.2f %21.2f" % row)
    # How close the prediction comes is a figure, not a test: on a busy machine the measured window
    # stretches while the prediction does not. bench/lab_failback.py prints predicted_vs_actual per size.
    assert all(predicted > 0 and actual > 0 for _, predicted, actual, _ in rows)
    assert Replica.objects.get(pk=replica.pk).measured_shutdown_s is not None  # what the next prediction learns from


def test_it_states_the_method_of_every_disk_before_the_switch(lab, operator):
    tracked = replica_named("app-erp")
    untracked = replica_named("web-01")  # seeded without change tracking
    lab.set_vm_options(untracked.vm_id, cbt=False)
    for replica, method, why in (
        (tracked, "tracked", "Change tracking"),
        (untracked, "digest", "Change tracking unavailable"),
    ):
        session = start(operator, replica)
        forecast = jobs.run_readiness(session.pk, catch_up=False)
        assert {d["method"] for d in forecast["disks"]} == {method}
        assert all(d["why"].startswith(why) for d in forecast["disks"])
        # Phase 1 stated its own method per disk before copying.
        assert all(
            d.method == "full" and "allocated block" in d.method_reason
            for d in FailbackSession.objects.get(pk=session.pk).disks.all()
        )


def test_a_catch_up_sync_keeps_the_pending_delta_small(lab, operator):
    replica = replica_named("app-erp")
    lab.set_vm_options(replica.vm_id, workload=False)
    session = start(operator, replica)
    write_changes(lab, replica, 4 * MiB)
    before = jobs.run_readiness(session.pk, catch_up=False)
    after = jobs.run_readiness(session.pk, catch_up=True)
    assert before["changed_bytes"] >= 4 * MiB and after["changed_bytes"] == 0
    assert after["window_s"] < before["window_s"]
    row = AuditEvent.objects.get(session=session, action="catch_up")
    assert sum(row.data["bytes_written"].values()) >= 4 * MiB
    workflow.switch_now(operator, session.pk)
    session = FailbackSession.objects.get(pk=session.pk)
    assert session.status == SessionStatus.FAILBACK
    for disk in session.disks.all():  # the switch after a catch-up still ends byte-identical
        with (
            open(lab.disk_path(replica.vm_id, disk.key), "rb") as a,
            open(lab.disk_path(session.production_vm_id, disk.key), "rb") as b,
        ):
            assert a.read() == b.read()


@pytest.fixture
def large_lab(db, settings):
    import os

    from failback.hypervisors.lab import LabHypervisor

    call_command("seed_lab", "--count", "2", "--scale", "1", "--no-user", stdout=open(os.devnull, "w"))
    return LabHypervisor(settings.LAB_ROOT)


def fill(lab, replica, total):
    """The guest writes ``total`` bytes of data (1 MiB pieces) from the end of its disks backwards, so that
    phase 1 has that much more to copy and a digest delta that much more to read."""
    piece = bytes(range(256)) * (MiB // 256)
    left = total
    for disk in replica.disks.all():
        for offset in range(disk.capacity_bytes - MiB, -1, -MiB):
            if left <= 0:
                return
            lab.guest_write(replica.vm_id, disk.key, offset, piece)
            left -= MiB


def allocated(lab, replica):
    from failback.transfer.sparse import allocated_bytes

    total = 0
    for disk in replica.disks.all():
        with open(lab.disk_path(replica.vm_id, disk.key), "rb") as f:
            total += allocated_bytes(f.fileno(), 0, disk.capacity_bytes)
    return total


def throttled_switch(lab, operator, replica, *, cbt, changed_fraction, phase1_s):
    """A failback whose phase 1 the bandwidth limit stretches to about ``phase1_s``, then a switch:
    (predicted window shown before it, measured window) and the figures of the round."""
    lab.set_vm_options(replica.vm_id, tools_installed=False, workload=False, cbt=cbt)
    data = allocated(lab, replica)
    limit_mbps = max(1, int(data / phase1_s / 1e6))
    session = start(operator, replica, bandwidth_mbps=limit_mbps)
    session = FailbackSession.objects.get(pk=session.pk)
    assert session.status == SessionStatus.READY_TO_SWITCH, session.error
    took = session.phase1_duration.total_seconds()
    assert took >= 0.9 * data / (limit_mbps * 1e6)  # the limit did hold phase 1 back
    capacity = sum(d.capacity_bytes for d in replica.disks.all())
    write_changes(lab, replica, int(capacity * changed_fraction) // MiB * MiB)
    forecast = jobs.run_readiness(session.pk, catch_up=False)
    assert "limit held it back" in forecast["data_basis"] and "unlimited" in forecast["data_basis"]
    # The rule itself, free of the machine's speed: the rates the prediction stands on are of the time
    # spent working, which leaves out the time the limit held phase 1 back, so they are above the rate
    # the throttled phase 1 ran at, and the data part is below what the same bytes take at the limit.
    # (A bound of 3x the limit failed once on a busy machine: 54 MB/s working against a 21 MB/s limit.)
    base = FailbackSession.objects.get(pk=session.pk).prediction["base"]
    assert base["limit_held_s"] > 0 and base["working_s"] <= base["seconds"] - base["limit_held_s"] + 0.002
    assert base["read_bps"] == pytest.approx(base["allocated_bytes"] / base["working_s"], rel=0.01), base
    assert base["read_bps"] > base["allocated_bytes"] / base["seconds"], base
    limit_bps = limit_mbps * 1e6
    at_the_limit_s = (forecast["changed_bytes"] + forecast["read_bytes"]) / limit_bps
    assert forecast["data_s"] < at_the_limit_s or forecast["data_s"] < 0.5, (forecast, at_the_limit_s)
    workflow.switch_now(operator, session.pk)
    session = FailbackSession.objects.get(pk=session.pk)
    assert session.status == SessionStatus.FAILBACK, session.error
    actual = session.switch_window.total_seconds()  # replica going down -> production on, as recorded
    assert AuditEvent.objects.get(session=session, action="switch_window").data["predicted_s"] == forecast["window_s"]
    method = "tracked" if cbt else "digest"
    return forecast["window_s"], actual, (method, data / MiB, limit_mbps, took, forecast["changed_bytes"] / MiB)


@pytest.mark.parametrize("size", ["small", "large"])
def test_it_predicts_the_window_after_a_phase_1_slowed_by_a_bandwidth_limit(request, operator, size):
    """The limit holds back phase 1 only; the switch runs unlimited, so its prediction must not inherit
    the limit's rate. Small disks: a digest switch with nothing changed (as on a platform without change
    tracking, where the replica's data is read once) and a tracked switch with a quarter changed; a large
    disk: the digest switch, which reads all of its data. Each round is another replica's first switch,
    so the prediction stands on phase 1's rates alone."""
    if size == "small":
        lab = request.getfixturevalue("bigger_lab")
        by_size = sorted(Replica.objects.all(), key=lambda r: -sum(d.capacity_bytes for d in r.disks.all()))
        rounds = [(by_size[0], False, 0.0, 4), (by_size[1], True, 0.25, 4)]
    else:
        lab = request.getfixturevalue("large_lab")
        replica = max(Replica.objects.all(), key=lambda r: sum(d.capacity_bytes for d in r.disks.all()))
        fill(lab, replica, 64 * MiB)
        rounds = [(replica, False, 0.0, 10)]
    rows = [
        throttled_switch(lab, operator, replica, cbt=cbt, changed_fraction=fraction, phase1_s=phase1_s)
        for replica, cbt, fraction, phase1_s in rounds
    ]
    print("\nmethod allocated_mib limit_MBps phase1_s changed_mib predicted_s measured_s")
    for predicted, actual, (method, data_mib, limit, took, changed) in rows:
        print(f"{method:7} {data_mib:13.0f} {limit:10d} {took:8.2f} {changed:11.1f} {predicted:11.2f} {actual:10.2f}")
    # How close predicted and measured come (within 30 % or 2 s) is bench/prediction.py's figure: on a busy
    # machine the measured window stretches while the prediction does not.
    assert all(predicted > 0 and actual > 0 for predicted, actual, _ in rows)
