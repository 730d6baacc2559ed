"""The auditor's filters over the audit trail, shared by the page and its CSV/JSON export."""

from datetime import datetime, time, timedelta

from django import forms
from django.db import connections
from django.db.models import Q, TextField, Value
from django.db.models.expressions import RawSQL
from django.db.models.functions import Cast, Upper
from django.forms.utils import flatatt
from django.utils import timezone
from django.utils.html import escape
from django.utils.safestring import mark_safe

from .choices import AuditAction, Outcome
from .forms import FilterDateField, IdField
from .models import AuditEvent


class OptionsInOnePass(forms.Select):
    """A select whose options are written here in one pass: through Django's template per option, the action
    filter's seventy options were the audit page's largest part of its rendering (~9 ms a view)."""

    def render(self, name, value, attrs=None, renderer=None):
        widget = self.get_context(name, value, attrs)["widget"]
        options = "".join(
            f'<option value="{escape(option["value"])}"{" selected" if option["selected"] else ""}>'
            f"{escape(option['label'])}</option>"
            for _, group, _ in widget["optgroups"]
            for option in group
        )
        return mark_safe(f'<select name="{escape(widget["name"])}"{flatatt(widget["attrs"])}>{options}</select>')


class AuditFilterForm(forms.Form):
    q = forms.CharField(label="Search details", required=False, max_length=200)
    user = forms.CharField(label="User", required=False, max_length=150)
    replica = forms.CharField(label="Replica", required=False, max_length=200)
    session = IdField(label="Session #")
    action = forms.ChoiceField(
        label="Action", required=False, choices=[("", "Any")] + list(AuditAction.choices), widget=OptionsInOnePass
    )
    outcome = forms.ChoiceField(
        label="Result", required=False, choices=[("", "Any")] + list(Outcome.choices), widget=OptionsInOnePass
    )
    since = FilterDateField(label="From (date)")
    until = FilterDateField(label="To (date, inclusive)")

    def clean(self):
        data = super().clean()
        if data.get("since") and data.get("until") and data["since"] > data["until"]:
            raise forms.ValidationError("The start date is after the end date.")
        return data


def event_rows():
    """The audit rows as the page and the exports show them (with their replica)."""
    return AuditEvent.objects.select_related("replica")


def filtered_events(params):
    """(form, queryset) for the given GET parameters; an invalid form filters nothing out but says why
    (the page shows the message; the exports and the API refuse)."""
    form = AuditFilterForm(params or None)
    events = event_rows().order_by("-at", "-id")
    if not form.is_valid():
        return form, events
    data = form.cleaned_data
    tz = timezone.get_current_timezone()
    if data["q"]:  # the detail and the structured data (reasons, options, digests)
        events = text_search(events, data["q"])
    if data["user"]:  # any case, as UPPER() of both sides: the form the audit_by_user_any_case index is built on
        events = events.alias(actor_upper=Upper("actor_name")).filter(actor_upper=Upper(Value(data["user"])))
    if data["replica"]:
        events = events.filter(
            Q(replica__name__icontains=data["replica"]) | Q(session__replica__name__icontains=data["replica"])
        )
    if data["session"]:
        events = events.filter(session_id=data["session"])
    if data["action"]:
        events = events.filter(action=data["action"])
    if data["outcome"]:
        events = events.filter(outcome=data["outcome"])
    if data["since"]:
        events = events.filter(at__gte=datetime.combine(data["since"], time.min, tzinfo=tz))
    if data["until"]:
        events = events.filter(at__lt=datetime.combine(data["until"] + timedelta(days=1), time.min, tzinfo=tz))
    return form, events


def unfiltered(form):
    """The form filters nothing out: no parameter, none filled in, or refused (the page says why)."""
    return not form.is_bound or not form.is_valid() or not any(form.cleaned_data.values())


def trail_count(using="default"):
    """How many rows the whole trail holds. PostgreSQL: the tally migration 0022 keeps beside the trail (exact
    in this transaction's snapshot, a few rows to add up instead of every entry of an index); SQLite counts."""
    connection = connections[using]
    if connection.vendor != "postgresql":
        return AuditEvent.objects.using(using).count()
    with connection.cursor() as cursor:
        cursor.execute("SELECT COALESCE(SUM(n), 0) FROM failback_audit_tally")
        return int(cursor.fetchone()[0])


def contains(events, text):
    """The plain comparison: on PostgreSQL, the expressions migration 0017's trigram indexes are built on."""
    return events.annotate(data_text=Cast("data", TextField())).filter(
        Q(detail__icontains=text) | Q(data_text__icontains=text)
    )


FEW_MATCHES = 5000  # see text_search
SQLITE_SEARCH = "SELECT rowid FROM failback_audit_search WHERE failback_audit_search MATCH %s"


def text_search(events, text):
    """Rows whose detail or data contains ``text``, whatever its case: one substring search, served by
    migration 0017's index (trigram GIN indexes on PostgreSQL, used by this very comparison; an FTS5
    trigram table on SQLite, which needs three characters: shorter texts are compared row by row)."""
    vendor = connections[events.db].vendor
    if vendor == "sqlite" and len(text) >= 3:
        phrase = '"' + text.replace('"', '""') + '"'  # FTS5 syntax: one quoted phrase, a substring for trigrams
        return events.filter(pk__in=RawSQL(SQLITE_SEARCH, [phrase]))
    matching = contains(events, text)
    if vendor == "postgresql":
        # A text found in few old rows: asked newest first, PostgreSQL would walk the date index and test
        # every row until a page of matches (seconds); the matches' keys from the trigram indexes first,
        # then the page among them. A text found in many rows keeps the plain query, which finds a page
        # of them near the top of the date index at once.
        keys = list(matching.order_by().values_list("pk", flat=True)[: FEW_MATCHES + 1])
        if len(keys) <= FEW_MATCHES:
            return events.filter(pk__in=keys)
    return matching


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(value):
    """Spreadsheets run cells that start like a formula: neutralise them (OWASP CSV injection)."""
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(FORMULA_START) else text


def filter_errors(form):
    """The form's complaints in one line, as the page shows them: "Session #: Ensure this value …"."""
    parts = [" ".join(form.non_field_errors())] if form.non_field_errors() else []
    parts += [f"{form.fields[f].label}: {' '.join(errors)}" for f, errors in form.errors.items() if f != "__all__"]
    return " ".join(parts)


EXPORT_FIELDS = ["at", "actor", "action", "outcome", "from_state", "to_state", "replica", "session", "detail", "data"]


def export_row(event):
    return {
        "at": event.at.isoformat(),
        "actor": event.actor_name,
        "action": event.action,
        "outcome": event.outcome,
        "from_state": event.from_state,
        "to_state": event.to_state,
        "replica": event.replica.name if event.replica else "",
        "session": event.session_id,
        "detail": event.detail,
        "data": event.data,
    }
