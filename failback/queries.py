"""Read-side queries shared by the pages, the API and the websockets: filtered lists and paging."""

from contextlib import closing

from django.core.paginator import Paginator
from django.db.models import Prefetch, Q

from .audit_filters import filter_errors
from .choices import ACTIVE, ReplicaState
from .forms import ReplicaFilterForm, SessionFilterForm
from .hypervisors.registry import hypervisor_for
from .models import FailbackSession, Replica

REPLICA_SORTS = {
    "name": "name",
    "-name": "-name",
    "state": "state",
    "host": "host",
    "site": "site",
    "updated": "-updated_at",
}


def attach_power_states(replicas):
    """The VM's live power state beside our replica state: one platform call per lab/vCenter."""
    platforms = {}
    for replica in replicas:
        platforms.setdefault((replica.platform, replica.connection_id), replica)
    states = {}
    for key, sample in platforms.items():
        try:
            with closing(hypervisor_for(sample)) as hv:
                states[key] = hv.power_states()
        except Exception as exc:  # an unreachable vCenter must not take the page down
            states[key] = exc
    for replica in replicas:
        found = states[(replica.platform, replica.connection_id)]
        replica.power = f"unknown ({found})" if isinstance(found, Exception) else found.get(replica.vm_id, "not found")
    return replicas


def filtered_replicas(params):
    """(queryset, filters, errors) for the replica list's search, filters and sort; shared by the page and the API.
    A filter that cannot be used (a NUL, too long) is left out, and errors says why."""
    # A replica's active session is asked for its number and status only (the list's link, the API's id)
    active = FailbackSession.objects.filter(status__in=ACTIVE).only("id", "replica_id", "status")
    # The vCenter's synced inventory (every VM it holds) is not read for each row of the list.
    replicas = (
        Replica.objects.select_related("connection")
        .defer("connection__inventory")
        .prefetch_related(Prefetch("sessions", queryset=active), "disks")
    )
    form = ReplicaFilterForm(params)
    form.is_valid()
    q, state, site, host, sort = (form.cleaned_data.get(k) or "" for k in ("q", "state", "site", "host", "sort"))
    if q:
        replicas = replicas.filter(Q(name__icontains=q) | Q(source_name__icontains=q))
    if state in ReplicaState.values:
        replicas = replicas.filter(state=state)
    if site:
        replicas = replicas.filter(site=site)
    if host:
        replicas = replicas.filter(host=host)
    sort = sort or "name"
    filters = {"q": q, "state": state, "site": site, "host": host, "sort": sort}
    return replicas.order_by(REPLICA_SORTS.get(sort, "name"), "pk"), filters, filter_errors(form)


def filtered_sessions(params):
    """(sessions newest first, errors), optionally of one status, replica or plan; shared by the page and the API.
    A filter that cannot be used (not a number, beyond the database's integer) is left out, and errors says why."""
    sessions = FailbackSession.objects.select_related("replica", "started_by")
    form = SessionFilterForm(params)
    form.is_valid()
    status, replica, plan = (form.cleaned_data.get(k) for k in ("status", "replica", "plan"))
    if status:
        sessions = sessions.filter(status=status)
    if replica:
        sessions = sessions.filter(replica_id=replica)
    if plan:
        sessions = sessions.filter(plan_id=plan)
    return sessions, filter_errors(form)


def page_by_ids(queryset, number, per_page, count=None, rows_from=None, count_limit=None):
    """Paginate over primary keys, then fetch the page's rows: a deep OFFSET then skips bare index
    entries instead of building (and joining) every skipped row, and a page in the second half is read
    from the other end (the last page skips nothing). ``count``: the queryset's row count when the caller
    knows it without counting (the whole audit trail's tally). ``rows_from``: where to fetch the page's
    rows by primary key when the filters need not be applied again (SQLite would rather walk a filter's
    index, 150,000 entries for a busy user, than look 100 keys up). ``count_limit``: count no further than
    this; more rows than that and the pages stop there, with ``page.more`` set (the page says so)."""
    paginator = Paginator(queryset.values_list("pk", flat=True), per_page)
    more = False
    if count is None and count_limit is not None:
        count = queryset.values("pk")[: count_limit + 1].count()  # stops at the limit, not at the last match
        more, count = count > count_limit, min(count, count_limit)
    if count is not None:
        paginator.count = count  # the paginator's cached property, set before anything asks it
    page = paginator.get_page(number)
    page.more = more
    bottom = (page.number - 1) * per_page
    count = page.paginator.count
    if queryset.ordered and not more and bottom > count // 2:  # past the middle: nearer from the other end
        top = min(bottom + per_page, count)
        ids = list(queryset.reverse().values_list("pk", flat=True)[count - top : count - bottom])[::-1]
    else:
        ids = list(page.object_list)
    rows = {row.pk: row for row in (queryset if rows_from is None else rows_from).filter(pk__in=ids)}
    page.object_list = [rows[pk] for pk in ids]
    return page
