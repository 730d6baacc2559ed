from datetime import timedelta
from functools import cache

from django import template

register = template.Library()


@register.filter
def seconds(value):
    """A short duration with a decimal under a minute ('2.4 s'), else as duration()."""
    if value is None or value == "":
        return "—"
    value = value.total_seconds() if isinstance(value, timedelta) else float(value)
    return f"{value:.1f} s" if value < 60 else duration(value)


@register.filter
def duration(value):
    """Seconds or a timedelta as '1 h 02 min', '3 min 05 s', '42 s'."""
    if value is None or value == "":
        return "—"
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"


BINARY_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB")


@register.filter(name="bytes")
def binary_size(value):
    """A size in binary units, as every page shows sizes: '512 B', '1.5 KiB', '64.0 MiB', '3.0 GiB'.

    (Django's filesizeformat divides by 1024 too but writes KB/MB/GB, which read as powers of ten.)"""
    if value is None or value == "":
        return "—"
    size = float(value)
    if abs(size) < 1024:
        return f"{int(size)} B"
    for unit in BINARY_UNITS:
        size /= 1024
        if abs(size) < 1024 or unit == BINARY_UNITS[-1]:
            return f"{size:,.1f} {unit}"


@register.filter
def rate(bps):
    """Bytes per second in MiB/s, the unit of every rate the portal shows (the tables and the chart)."""
    if not bps:
        return "—"
    return f"{bps / 2**20:,.1f} MiB/s"


@register.filter
def disk_rate(disk, limit_mbps):
    """A disk's read rate as its row shows it. Under a bandwidth limit, a pass that writes what it reads
    (phase 1's copy) runs at the limit on average; its rate, measured over the last few seconds, can read a
    few per cent above it (a block is read before its paced write), which is shown as the limit."""
    bps = disk.rate_bps
    if bps and limit_mbps and disk.phase == 1 and disk.bytes_written >= 0.95 * disk.bytes_done:
        bps = min(bps, limit_mbps * 10**6)
    return rate(bps)


@register.filter
def written_apart(disk):
    """Whether a disk's bytes written differ enough from its bytes read to be shown beside them: a delta
    (phase 2, catch-ups) or a copy that skips blocks already there; not the rounding of a plain copy."""
    return disk.phase == 2 or disk.bytes_written < 0.98 * disk.bytes_done


@register.filter
def bandwidth_limit(mbps):
    """A session's bandwidth limit: set in MB/s (10^6 bytes/s), shown in MiB/s like every rate, with the
    figure as it was typed: '2.9 MiB/s (set as 3 MB/s) on the data written'. The limit holds back writes;
    reading (a delta reads more than it writes) is not limited, so the read rate may be above it."""
    if not mbps:
        return "none"
    return f"{mbps * 10**6 / 2**20:,.1f} MiB/s (set as {mbps} MB/s) on the data written"


IDLE_GAP_S = 5.0  # samples come every second while data moves: a longer gap is time nothing moved


def chart_runs(samples, gap=IDLE_GAP_S):
    """The samples ([t, bytes/s, phase]) in time order, cut into runs of data moving; between two runs
    nothing moved (phase 1 over and the switch not begun, or a pause), so the chart draws that time idle
    at zero instead of a slope from one run's last rate to the next one's first."""
    runs = []
    for sample in sorted(samples, key=lambda s: s[0]):
        if runs and sample[0] - runs[-1][-1][0] <= gap and sample[2:3] == runs[-1][-1][2:3]:
            runs[-1].append(sample)
        else:
            runs.append([sample])
    return runs


@register.simple_tag
def throughput_chart(samples, limit_mbps=None, width=640, height=140):
    """Server-rendered SVG of transfer rate over time (numbers only, so nothing to escape): one line per
    run of data moving, idle time between runs drawn at zero and marked, phase 2 in its own colour.
    The peak and the latest figure are the same per-disk rates the disk table's Rate column shows."""
    from django.utils.safestring import mark_safe

    if not samples or len(samples) < 2:
        return mark_safe('<p class="muted">The chart appears once data is moving.</p>')
    t0 = min(s[0] for s in samples)
    span = max(s[0] - t0 for s in samples) or 1
    peak = max(s[1] for s in samples)
    limit = limit_mbps * 10**6 if limit_mbps else None
    top = max(peak, limit or 0) or 1
    pad, w, h = 40, width - 50, height - 30
    x = lambda t: pad + (t - t0) / span * w  # noqa: E731
    y = lambda bps: 10 + h - bps / top * h  # noqa: E731
    runs = chart_runs(samples)
    parts, idle_s = [], 0.0
    for i, run in enumerate(runs):
        phase = run[0][2] if len(run[0]) > 2 else 1
        points = [(x(run[0][0]), y(0))] + [(x(s[0]), y(s[1])) for s in run] + [(x(run[-1][0]), y(0))]
        parts.append(
            f'<polyline points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in points)}" class="rate phase-{phase}"/>'
        )
        if i + 1 < len(runs):  # nothing moved until the next run
            start, end = run[-1][0], runs[i + 1][0][0]
            idle_s += end - start
            parts.append(
                f'<rect x="{x(start):.1f}" y="10" width="{max(1.0, x(end) - x(start)):.1f}" height="{h}" class="idle"/>'
                f'<text x="{x(start) + 4:.1f}" y="{10 + h / 2:.0f}" class="idle-label">idle {duration(end - start)}</text>'
            )
    if limit:  # the bandwidth limit, which holds the data written at or under it on average
        parts.append(
            f'<line x1="{pad}" y1="{y(limit):.1f}" x2="{pad + w}" y2="{y(limit):.1f}" class="limit"/>'
            f'<text x="{pad + w - 120}" y="{y(limit) - 3:.1f}">limit {limit / 2**20:.1f} MiB/s</text>'
        )
    latest = max(samples, key=lambda s: s[0])[1]
    label = f"Throughput over time, peak {peak / 2**20:.1f} MiB/s, latest {latest / 2**20:.1f} MiB/s over {span:.0f} s"
    if idle_s:
        label += f", of which {duration(idle_s)} idle"
    return mark_safe(
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="{label}">'
        f'<line x1="{pad}" y1="{10 + h}" x2="{pad + w}" y2="{10 + h}" class="axis"/><line x1="{pad}" y1="10" x2="{pad}" y2="{10 + h}" class="axis"/>'
        f'<text x="2" y="16">{top / 2**20:.0f}</text><text x="2" y="{10 + h}">0</text>'
        f'<text x="{pad}" y="{height - 4}">0 s</text><text x="{pad + w - 40}" y="{height - 4}">{span:.0f} s</text>'
        f'<text x="{pad + 6}" y="22">MiB/s</text>{"".join(parts)}</svg>'
        f'<p class="muted chart-note">Peak {peak / 2**20:.1f} MiB/s, latest {latest / 2**20:.1f} MiB/s'
        f"{f'; idle {duration(idle_s)} (nothing moved)' if idle_s else ''}.</p>"
    )


@register.filter
def split_pairs(text):
    """'a:A,b:B' -> [('a', 'A'), ('b', 'B')] for small fixed option lists in templates."""
    return [tuple(item.split(":", 1)) for item in text.split(",")]


@register.filter
def since(end, start):
    """{{ end|since:start }}: the duration between two datetimes, or — when either is missing."""
    if not end or not start:
        return "—"
    return duration(end - start)


@register.filter
def scheduled_switch(session):
    """When the session's scheduled switch comes, while it still may (the session page's countdown)."""
    from ..actions import scheduled_switch as due

    return due(session)


@register.simple_tag
def audit_rows(events):
    """The audit page's rows, written here in one pass: a page holds a hundred rows, and rendering each
    cell through the template engine made the page many times slower than its database work."""
    from django.urls import reverse
    from django.utils import timezone
    from django.utils.html import escape
    from django.utils.safestring import mark_safe

    from ..choices import AuditAction, Outcome

    actions, outcomes = dict(AuditAction.choices), dict(Outcome.choices)
    session_url = reverse("failback:session", args=[0])[: -len("0/")]
    rows = []
    for e in events:
        at = timezone.localtime(e.at)
        where = f'<a href="{session_url}{e.session_id}/">#{e.session_id}</a>' if e.session_id else ""
        if e.replica_id and e.replica:
            where += f" {escape(e.replica.name)}"
        moved = (
            f"{escape(state_label(e.from_state))} → {escape(state_label(e.to_state))}"
            if e.from_state != e.to_state
            else ""
        )
        outcome = escape(e.outcome)
        rows.append(
            f'<tr class="outcome-{outcome}"><td>{at:%Y-%m-%d %H:%M:%S} {escape(at.tzname() or "")}</td>'
            f"<td>{escape(e.actor_name)}</td>"
            f'<td title="{escape(e.action)}">{escape(actions.get(e.action, e.action))}</td><td>{where}</td>'
            f'<td>{moved}</td><td><span class="badge outcome {outcome}">{escape(outcomes.get(e.outcome, e.outcome))}</span></td>'
            f"<td>{escape(e.detail)}</td></tr>"
        )
    return mark_safe("\n".join(rows) or '<tr><td colspan="7">Nothing matches.</td></tr>')


@register.filter
def state_label(value):
    """A session status or replica state kept in an audit row, named as the pages name it: 'ready_to_switch'
    reads 'Ready to switch'. A value no longer known is shown as stored; none is a dash."""
    if not value:
        return "—"
    return _state_labels().get(value, value)


@cache
def _state_labels():
    from ..choices import ReplicaState, SessionStatus

    return {**dict(ReplicaState.choices), **dict(SessionStatus.choices)}


@register.filter
def window_line(window):
    """A stored maintenance window as the line typed in the page (windows.as_line)."""
    from ..windows import as_line

    return as_line(window)


@register.simple_tag
def session_rows(sessions):
    """The session list's rows, written here in one pass, as the audit page's are (fifty rows of seven cells
    through the template engine were most of the page's time)."""
    from django.urls import reverse
    from django.utils import timezone
    from django.utils.html import escape
    from django.utils.safestring import mark_safe

    session_url = reverse("failback:session", args=[0])[: -len("0/")]
    rows = []
    for s in sessions:
        switch = escape(s.get_switch_mode_display())
        if s.switch_at:
            at = timezone.localtime(s.switch_at)
            switch += f" · {at:%Y-%m-%d %H:%M} {escape(at.tzname() or '')}"
        created = timezone.localtime(s.created_at)
        rows.append(
            f'<tr><td><a href="{session_url}{s.pk}/">#{s.pk}</a></td><td>{escape(s.replica.name)}</td>'
            f"<td>{escape(s.vm_name)} on {escape(s.target_host)}</td>"
            f'<td><span class="badge {escape(s.colour)}">{escape(s.get_status_display())}</span></td>'
            f"<td>{switch}</td><td>{escape(s.started_by.get_username())}</td>"
            f"<td>{created:%Y-%m-%d %H:%M:%S} {escape(created.tzname() or '')}</td></tr>"
        )
    return mark_safe("\n".join(rows) or '<tr><td colspan="7">No failback sessions yet.</td></tr>')


@register.simple_tag(takes_context=True)
def replica_rows(context, replicas):
    """The replica list's rows, written here in one pass (fifty rows with their disks, power button and
    failback link through the template engine were most of the page's time). What each row offers is
    decided elsewhere (``can_start_failback``, ``rehearsal.power_offer``); this only writes it."""
    from django.utils.safestring import mark_safe

    rows = _ReplicaRows(context["request"], context.get("can_operate"))
    html = "\n    ".join(rows.row(r) for r in replicas)
    return mark_safe(
        html
        or '<tr><td colspan="8">No replicas match. Run <code>manage.py seed_lab</code> for the demo lab, or add a '
        "vCenter connection.</td></tr>"
    )


class _ReplicaRows:
    def __init__(self, request, can_operate):
        from django.middleware.csrf import get_token
        from django.utils.html import escape

        self.escape, self.can_operate, self.prefixes = escape, can_operate, {}
        self.csrf = f'<input type="hidden" name="csrfmiddlewaretoken" value="{escape(get_token(request))}">'
        self.here = escape(request.get_full_path())

    def url(self, name, pk, *rest):
        """The page's URL for this row: reversed once per name with 0 in place of the key (a reverse per
        row and button was a tenth of the page's time), then the key put in."""
        from django.urls import reverse

        key = (name, *rest)
        if key not in self.prefixes:
            self.prefixes[key] = self.escape(reverse(f"failback:{name}", args=[0, *rest])).split("/0/", 1)
        head, tail = self.prefixes[key]
        return f"{head}/{pk}/{tail}"

    def row(self, r):
        escape, name = self.escape, self.escape(r.name)
        select = (
            f'<input type="checkbox" name="replica" value="{r.pk}" form="plan-select" aria-label="Select {name}">'
            if self.can_operate and r.can_start_failback
            else ""
        )
        disks = list(r.disks.all())
        sizes = " + ".join(binary_size(d.capacity_bytes) for d in disks)
        return (
            f'<tr id="replica-{r.pk}">\n      <td>{select}</td>\n'
            f"      <td>{name}</td><td>{escape(r.source_name)}</td><td>{escape(r.site)} / {escape(r.host)}</td>\n"
            f"      <td>{len(disks)} · {sizes}</td>\n"
            f'      <td><span class="badge {escape(r.colour)}">{escape(r.get_state_display())}</span></td>\n'
            f"      <td>{self.power(r, name)}</td>\n      <td>\n        {self.failback(r, name)}\n      </td>\n    </tr>"
        )

    def power(self, r, name):
        power = self.escape(r.power)
        if not r.lab_power:
            return power
        to = self.escape(r.lab_power)
        confirm = (
            f' data-confirm="Power off lab VM {name} at once? Its guest stops without a shutdown."'
            if r.lab_power == "off"
            else ""
        )
        return (
            f'{power}\n        <form method="post" action="{self.url("lab_power", r.pk, r.lab_power)}" '
            f'class="inline"{confirm}>{self.csrf}<input type="hidden" name="next" value="{self.here}">'
            f'<button type="submit" aria-label="Power {to} {name}">Power {to}</button></form>'
        )

    def failback(self, r, name):
        session = r.active_session
        if session:
            status = self.escape(session.get_status_display())
            return f'<a href="{self.url("session", session.pk)}">#{session.pk} {status}</a>'
        if r.can_start_failback and self.can_operate:
            return f'<a class="button primary" href="{self.url("start", r.pk)}">Start failback</a>'
        if r.state == "ready" and self.can_operate:
            return (
                f'<form method="post" action="{self.url("declare_failover", r.pk)}" data-confirm="Declare that '
                f'{name} now runs the workload of {self.escape(r.source_name)} (Failover)?">{self.csrf}'
                '<button type="submit">Declare failover</button></form>'
            )
        return "—"
