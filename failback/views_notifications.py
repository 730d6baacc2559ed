"""Notification pages: a user's own e-mail subscriptions; Administrators' endpoints and the deliveries log.

Views only glue: the rules (who may, what is valid, the audit rows) are in failback.notifications.config.
"""

from django import forms
from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from .audit import Refused
from .notifications import config
from .notifications.models import Delivery, NotificationEndpoint, NotifyEvent

EVENT_CHOICES = NotifyEvent.choices


class SubscriptionForm(forms.Form):
    email = forms.EmailField(label="Your e-mail address", required=False)
    events = forms.MultipleChoiceField(
        label="Tell me by e-mail when", choices=EVENT_CHOICES, required=False, widget=forms.CheckboxSelectMultiple
    )


class EndpointForm(forms.ModelForm):
    url = forms.URLField(label="URL", required=False, max_length=500, assume_scheme="https")
    events = forms.MultipleChoiceField(
        label="Events sent here", choices=EVENT_CHOICES, required=False, widget=forms.CheckboxSelectMultiple
    )
    secret = forms.CharField(
        label="Signing secret",
        required=False,
        max_length=200,
        widget=forms.PasswordInput(render_value=False),
        help_text="Webhooks only. Leave blank to keep the current one (a new webhook gets a generated secret, shown once).",
    )

    class Meta:
        model = NotificationEndpoint
        fields = ["name", "kind", "url", "addresses", "events", "active"]
        help_texts = {"addresses": "E-mail only: comma-separated addresses, e.g. the on-call team's mailbox."}


def _require_manager(request):
    if not config.may_manage(request.user):
        raise PermissionDenied("Notification endpoints are managed by Administrators.")


@require_http_methods(["GET", "POST"])
def my_notifications(request):
    initial = {"email": request.user.email, "events": config.subscribed_events(request.user)}
    form = SubscriptionForm(request.POST or None, initial=initial)
    error = None
    if request.method == "POST" and form.is_valid():
        try:
            config.set_subscription(request.user, form.cleaned_data["events"], email=form.cleaned_data["email"])
        except Refused as refused:
            error = refused.message
        else:
            messages.success(request, "Your e-mail notifications are saved.")
            return redirect("failback:my_notifications")
    return render(
        request,
        "failback/notifications_mine.html",
        {"form": form, "error": error},
        status=400 if request.method == "POST" else 200,
    )


@require_GET
def endpoint_list(request):
    _require_manager(request)
    return render(request, "failback/notifications_endpoints.html", {"endpoints": NotificationEndpoint.objects.all()})


@never_cache  # the answer to a new webhook shows its generated secret once
@require_http_methods(["GET", "POST"])
def endpoint_edit(request, pk=None):
    _require_manager(request)
    instance = get_object_or_404(NotificationEndpoint, pk=pk) if pk else NotificationEndpoint()
    form = EndpointForm(request.POST or None, instance=instance)
    error = secret = None
    if request.method == "POST" and form.is_valid():
        try:
            secret = config.save_endpoint(request.user, form.save(commit=False), secret=form.cleaned_data["secret"])
        except Refused as refused:
            error = refused.message
        else:
            if secret is None:
                messages.success(request, f"Endpoint {instance.name} saved.")
                return redirect("failback:notify_endpoints")
    return render(
        request,
        "failback/notifications_endpoint_form.html",
        {"form": form, "endpoint": instance if instance.pk else None, "error": error, "secret": secret},
        status=400 if request.method == "POST" and secret is None else 200,
    )


@require_POST
def endpoint_delete(request, pk):
    _require_manager(request)
    try:
        name = config.delete_endpoint(request.user, pk)
    except Refused as refused:
        messages.error(request, refused.message)
    else:
        if name:
            messages.success(request, f"Endpoint {name} deleted; its deliveries stay listed.")
    return redirect("failback:notify_endpoints")


@require_GET
def delivery_list(request):
    _require_manager(request)
    deliveries = Delivery.objects.select_related("notification", "endpoint", "user").prefetch_related("attempt_rows")
    endpoint = request.GET.get("endpoint", "")
    if endpoint.isdigit():
        deliveries = deliveries.filter(endpoint_id=int(endpoint))
    return render(
        request,
        "failback/notifications_deliveries.html",
        {"deliveries": deliveries[:200], "endpoints": NotificationEndpoint.objects.all(), "endpoint": endpoint},
    )
