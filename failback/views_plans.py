"""Failback plan pages: one view per step, rules in failback.plans."""

from contextlib import closing

from django.contrib import messages
from django.http import Http404
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from . import plans, workflow
from .actions import PLAN_ACTIONS
from .forms import DB_INT_MAX, PlanForm
from .hypervisors.registry import hypervisor_for
from .models import FailbackPlan, Replica
from .presenters import can_operate, plan_context
from .workflow import Refused


@require_GET
def plan_list(request):
    return render(
        request, "failback/plan_list.html", {"plans": FailbackPlan.objects.select_related("created_by")[:200]}
    )


@require_http_methods(["GET", "POST"])
def plan_new(request):
    ids = [
        int(i)
        for i in request.GET.getlist("replica") + request.POST.getlist("replica")
        if i.isdecimal() and 0 < int(i) <= DB_INT_MAX
    ]
    replicas = list(Replica.objects.filter(pk__in=ids).prefetch_related("disks").order_by("name"))
    if not replicas:
        messages.error(request, "Select one or more replicas in Failover, then press “Fail back selected as a plan”.")
        return redirect("failback:replicas")
    if mixed := plans.mixed_platforms(replicas):
        messages.error(request, mixed)
        return redirect("failback:replicas")
    with closing(hypervisor_for(replicas[0])) as hv:
        inventory = hv.inventory()
    form = PlanForm(request.POST or None, replicas=replicas, inventory=inventory)
    error = None
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            plan = plans.start_plan(
                request.user,
                name=data["name"],
                members=form.members(),
                concurrency=data["concurrency"],
                switch_mode=data["switch_mode"],
                switch_at=data["switch_at"],
                power_on_after=data["power_on_after"],
                power_on_delay_s=data["power_on_delay_s"],
                guest_gate=data["guest_gate"] or "",
                guest_gate_address=data["guest_gate_address"],
                guest_gate_timeout_s=data["guest_gate_timeout_s"] or 300,
                hooks=form.hooks(),
                reason=data["reason"],
            )
        except Refused as refused:
            error = refused.message
        else:
            messages.success(request, f"Plan {plan.name} started with {len(replicas)} replica(s).")
            return redirect("failback:plan", pk=plan.pk)
    elif request.method == "POST":
        error = workflow.refuse_input(
            "Start plan refused: please correct the fields marked below ("
            + "; ".join(f"{f}: {' '.join(e)}" for f, e in form.errors.items())[:400]
            + ").",
            action="start_plan",
            actor=request.user,
        )
    return render(
        request,
        "failback/plan_form.html",
        {"form": form, "replicas": replicas, "error": error, "can_operate": can_operate(request.user)},
        status=400 if request.method == "POST" else 200,
    )


@require_GET
def plan_detail(request, pk):
    plan = get_object_or_404(FailbackPlan, pk=pk)
    return render(
        request, "failback/plan_detail.html", plan_context(plan, request.user)
    )  # members kept live over /ws/plans/<pk>/


@require_POST
def plan_action(request, pk, action):
    plan = get_object_or_404(FailbackPlan, pk=pk)
    spec = PLAN_ACTIONS.get(action)
    if spec is None:
        raise Http404("No such action")
    form = spec.form(request.POST)
    try:
        if not form.is_valid():
            problems = "; ".join(" ".join(e) for e in form.errors.values())
            raise Refused(
                workflow.refuse_input(
                    f"{spec.audit.label} refused: {problems}",
                    action=spec.audit,
                    actor=request.user,
                    data={"plan": plan.name},
                )
            )
        done = spec.perform(request.user, plan.pk, form.cleaned_data)
        messages.success(request, spec.notice(plan, done, form.cleaned_data))
    except Refused as refused:
        messages.error(request, refused.message)
    return redirect("failback:plan", pk=plan.pk)
