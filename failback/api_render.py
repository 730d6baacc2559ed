"""The API's JSON shapes of replicas, sessions and plans (the schemas are in api_schemas.py)."""

from django.db.models import Prefetch

from . import actions, approvals, windows
from .models import ApprovalRequest, FailbackPlan, FailbackSession
from .queries import attach_power_states

SESSION_FIELDS = (
    "vm_name", "target_host", "target_datastore", "network_map", "resource_pool", "folder", "production_vm_id",
    "switch_mode", "switch_at", "power_on_after", "shutdown_timeout_s", "bandwidth_mbps", "commit_policy",
    "commit_after_min", "policy_due_at", "policy_stopped_at", "reason", "created_at", "phase1_started_at",
    "phase1_ended_at", "switch_started_at", "replica_off_at", "phase2_ended_at", "production_on_at", "ended_at",
    "predicted_window_s", "stop_method", "error",
)  # fmt: skip
DISK_FIELDS = (
    "key", "capacity_bytes", "phase", "method", "method_reason", "bytes_total", "bytes_done", "bytes_written",
    "rate_bps", "eta_s", "phase1_digest", "source_digest", "target_digest", "verified",
)  # fmt: skip
PLAN_FIELDS = (
    "id", "name", "created_at", "reason", "concurrency", "switch_mode", "switch_at", "power_on_after",
    "power_on_delay_s", "switch_started_at", "guest_gate", "guest_gate_address", "guest_gate_timeout_s", "hooks",
)  # fmt: skip


def replicas(rows):
    attach_power_states(rows)
    return [
        {
            "id": r.pk,
            "name": r.name,
            "source_name": r.source_name,
            "platform": r.platform,
            "vm_id": r.vm_id,
            "host": r.host,
            "site": r.site,
            "state": r.state,
            "state_label": r.get_state_display(),
            "power": r.power,
            "production_vm_id": r.production_vm_id,
            "active_session_id": getattr(r.active_session, "pk", None),
            "can_start_failback": r.can_start_failback,
            "updated_at": r.updated_at,
            "disks": [
                {"key": d.key, "capacity_bytes": d.capacity_bytes, "datastore": d.datastore} for d in r.disks.all()
            ],
        }
        for r in rows
    ]


def session(s):
    window = s.switch_window
    return {
        "id": s.pk,
        "replica_id": s.replica_id,
        "replica_name": s.replica.name,
        "plan_id": s.plan_id,
        "plan_order": s.plan_order,
        "status": s.status,
        "status_label": s.get_status_display(),
        "allowed_actions": actions.allowed(s),
        **{f: getattr(s, f) for f in SESSION_FIELDS},
        "started_by": s.started_by.get_username(),
        "switch_window_s": window.total_seconds() if window is not None else None,
        "switch_windows": windows.session_summary(s),
        "convergence": (s.prediction or {}).get("convergence") if s.status == "ready_to_switch" else None,
        "waiting_for_approval": waiting(approvals.waiting(s)),
        "disks": [{**{f: getattr(d, f) for f in DISK_FIELDS}, "percent": d.percent} for d in s.disks.all()],
    }


def waiting(requests):
    return [
        {
            "id": r.pk,
            "action": r.action,
            "requested_by": r.requested_by.get_username() if r.requested_by_id else None,
            "expires_at": r.expires_at,
            "text": approvals.describe(r),
        }
        for r in requests
    ]


def sessions(rows):
    return [session(s) for s in rows]


def plans(rows):
    out = []
    for plan in rows:
        members = list(plan.sessions.all())
        out.append(
            {
                **{f: getattr(plan, f) for f in PLAN_FIELDS},
                "created_by": plan.created_by.get_username(),
                "percent": FailbackPlan.summary(members)["percent"],
                "switch_windows": windows.plan_summary(plan, members),
                "waiting_for_approval": waiting(approvals.waiting_for_plan(members, plan)),
                "members": [
                    {
                        "session_id": s.pk,
                        "plan_order": s.plan_order,
                        "replica_id": s.replica_id,
                        "replica_name": s.replica.name,
                        "status": s.status,
                        "status_label": s.get_status_display(),
                    }
                    for s in members
                ],
            }
        )
    return out


def pending_approvals():
    rows = ApprovalRequest.objects.filter(status=ApprovalRequest.Status.PENDING).select_related("requested_by")
    return Prefetch("approvals", queryset=rows, to_attr="pending_approvals")


def session_rows():
    return FailbackSession.objects.select_related("replica", "started_by").prefetch_related(
        "disks", pending_approvals()
    )


def plan_rows():
    members = (
        FailbackSession.objects.select_related("replica")
        .prefetch_related("disks", pending_approvals())
        .order_by("plan_order", "pk")
    )
    return FailbackPlan.objects.select_related("created_by").prefetch_related(Prefetch("sessions", queryset=members))


def fresh_session(pk):
    return session(session_rows().get(pk=pk))


def fresh_plan(pk):
    return plans([plan_rows().get(pk=pk)])[0]
