"""The approvals page: requests waiting for a second person, recent decisions, and (Administrators) which
actions need approval. The rules are in failback.approvals; this only shows and posts."""

from django.contrib import messages
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST

from . import approvals
from .choices import Approvable
from .models import ApprovalRequest, ApprovalRule, FailbackPlan
from .presenters import can_operate
from .workflow import Refused


@require_GET
def approval_list(request):
    approvals.expire_due()
    rows = ApprovalRequest.objects.select_related("session__replica", "requested_by", "decided_by")
    rules = {(r.action, r.plan_id) for r in ApprovalRule.objects.all()}
    context = {
        "pending": rows.filter(status=ApprovalRequest.Status.PENDING).order_by("expires_at"),
        "decided": rows.exclude(status=ApprovalRequest.Status.PENDING)[:50],
        "can_decide": can_operate(request.user),
        "can_rule": request.user.has_perm(approvals.RULES_PERMISSION),
        "rules": [(a, label, (a, None) in rules) for a, label in Approvable.choices],
        "plan_rules": ApprovalRule.objects.exclude(plan=None).select_related("plan"),
        "plans": FailbackPlan.objects.order_by("name"),
        "actions": Approvable.choices,
    }
    return render(request, "failback/approvals.html", context)


@require_POST
def approval_decide(request, pk, verb):
    decide = {"approve": approvals.approve, "reject": approvals.reject}.get(verb)
    if decide is None:
        messages.error(request, f"Unknown decision {verb!r}: approve or reject.")
        return redirect("failback:approvals")
    try:
        row = decide(request.user, pk, reason=request.POST.get("reason", ""))
    except Refused as refused:
        messages.error(request, refused.message)
    else:
        if row.status == ApprovalRequest.Status.FAILED:
            messages.error(request, f"Approved, but the action was refused when run: {row.result}")
        else:
            messages.success(request, f"Request #{row.pk} {row.get_status_display().lower()}.")
    return redirect("failback:approvals")


@require_POST
def approval_rule(request):
    plan = FailbackPlan.objects.filter(pk=request.POST.get("plan") or 0).first()
    try:
        approvals.set_rule(
            request.user, request.POST.get("action", ""), required=request.POST.get("required") == "yes", plan=plan
        )
    except Refused as refused:
        messages.error(request, refused.message)
    else:
        messages.success(request, "Saved.")
    return redirect("failback:approvals")
