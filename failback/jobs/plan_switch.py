"""A plan's switch: its members' phase 2 one after the other, in boot order."""

import threading

from django.db import connection
from django.utils import timezone

from .. import guest_gate, logging_context
from ..choices import GuestGate, SessionStatus
from ..models import FailbackSession
from .switch import run_switch


@logging_context.step("plan_switch", key="plan_id")
def run_plan_switch(plan_id):
    """Phase 2 of a plan's members, in boot order: the plan's guest-ready gate on each member before the
    next (a gate not met stops the rest: guest_gate.py), then the delay between power-ons."""
    from .. import plans
    from ..models import FailbackPlan

    plan = FailbackPlan.objects.get(pk=plan_id)
    members = list(
        plan.sessions.filter(status=SessionStatus.SWITCHING).order_by("plan_order", "pk").values_list("pk", flat=True)
    )
    pending = list(members)
    stop = threading.Event()

    def keep_waiting_members_alive():  # so the watchdog does not start them out of order
        while not stop.wait(5):
            FailbackSession.objects.filter(pk__in=list(pending)).update(heartbeat_at=timezone.now())
        connection.close()

    beater = threading.Thread(target=keep_waiting_members_alive, daemon=True)
    beater.start()
    try:
        for i, session_id in enumerate(members):
            if i and plan.guest_gate != GuestGate.NONE and not guest_gate.wait(plan, members[i - 1], pending):
                return
            if i and plan.power_on_delay_s:
                plans.wait_between_power_ons(plan, pending)
            pending.remove(session_id)
            run_switch(session_id)
    finally:
        stop.set()
        beater.join()
