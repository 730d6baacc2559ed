"""Switch when it fits: maintenance windows, a downtime budget, and writes that outpace the copy.

A session (or a plan) may carry maintenance windows, one-off or weekly, each in its own time zone, and a
downtime budget in seconds. Its switch is then automatic and starts at the first moment inside a window
when the predicted downtime (prediction.py, refreshed every minute by the readiness job) is within the
budget; no windows means any time, no budget means any downtime. ``automatic.switch_when_fits`` makes the
decisions on each readiness tick; this module holds the rules: the windows' shape and the refusals of bad
ones, when they occur, whether a forecast fits and why not, how often catch-ups run as a window nears, and
whether a VM's writes outpace the copy (the delta would never shrink).

A window is stored as a dict:

    {"kind": "once", "start": "2026-12-05T02:00", "end": "2026-12-05T04:00", "tz": "Europe/Paris"}
    {"kind": "weekly", "days": ["sat", "sun"], "start": "02:00", "end": "04:00", "tz": "Europe/Paris"}

and typed in the page one a line: ``once 2026-12-05 02:00-04:00 Europe/Paris``, ``weekly sat,sun
02:00-04:00 Europe/Paris``, ``daily 02:00-04:00 UTC``. Times are the zone's wall-clock times (zoneinfo).
"""

from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from . import broadcast
from .audit import audit, clean_reason, refuse, require_operator
from .choices import SCHEDULABLE, Outcome, SwitchMode

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
MAX_WINDOWS = 20
MAX_BUDGET_S = 7 * 24 * 3600
MIN_PENDING_BYTES = 1 << 20  # less change than this says nothing about a write rate
MIN_RATE_BYTES = 8 << 20  # a copy of less than this says nothing about a copy rate
ACTION = "set_switch_windows"


class WindowError(ValueError):
    """A window that cannot be accepted; the message is for the person who typed it."""


@dataclass(frozen=True)
class Occurrence:
    """One concrete opening of a window, in UTC."""

    start: datetime
    end: datetime
    window: dict

    @property
    def key(self):
        return f"{self.start.isoformat()}/{self.end.isoformat()}"

    @property
    def label(self):
        zone = ZoneInfo(self.window["tz"])
        start, end = self.start.astimezone(zone), self.end.astimezone(zone)
        until = f"{end:%H:%M}" if end.date() == start.date() else f"{end:%Y-%m-%d %H:%M}"
        return f"{start:%a %Y-%m-%d %H:%M}–{until} {self.window['tz']}"

    def as_dict(self):
        return {"start": self.start.isoformat(), "end": self.end.isoformat(), "label": self.label}


# -- the windows' shape ---------------------------------------------------------------------------------


def _zone(name):
    try:
        return ZoneInfo(str(name))
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise WindowError(f"Unknown time zone {str(name)[:60]!r}: use an IANA name such as Europe/Paris or UTC.")


def _clock(text, what):
    try:
        return time.fromisoformat(str(text))
    except ValueError:
        raise WindowError(f"The window's {what} {str(text)[:40]!r} is not a time of day (HH:MM).")


def _moment(text, what):
    try:
        value = datetime.fromisoformat(str(text))
    except ValueError:
        raise WindowError(f"The window's {what} {str(text)[:40]!r} is not a date and time (YYYY-MM-DDTHH:MM).")
    if value.tzinfo is not None:
        raise WindowError(f"The window's {what} is a wall-clock time of its zone: give it without an offset.")
    return value


def clean_window(raw):
    """One window in its stored shape, or ``WindowError`` saying what is wrong with it."""
    if not isinstance(raw, dict):
        raise WindowError("A window is an object with kind, start, end and tz.")
    kind, zone = raw.get("kind"), _zone(raw.get("tz", ""))
    if kind == "once":
        start, end = _moment(raw.get("start"), "start"), _moment(raw.get("end"), "end")
        if end <= start:
            raise WindowError(f"The window ends ({end:%Y-%m-%d %H:%M}) before it starts ({start:%Y-%m-%d %H:%M}).")
        if end - start > timedelta(days=7):
            raise WindowError("A one-off window lasts at most 7 days.")
        return {"kind": "once", "start": f"{start:%Y-%m-%dT%H:%M}", "end": f"{end:%Y-%m-%dT%H:%M}", "tz": zone.key}
    if kind == "weekly":
        days = raw.get("days") or []
        if not isinstance(days, list) or not days or any(str(d).lower()[:3] not in DAYS for d in days):
            raise WindowError(f"A weekly window names its days: some of {', '.join(DAYS)}.")
        start, end = _clock(raw.get("start"), "start"), _clock(raw.get("end"), "end")
        if end <= start and end != time(0):  # 00:00 as the end is midnight, the end of the day
            raise WindowError(
                f"The window ends ({end:%H:%M}) before it starts ({start:%H:%M}); a night window over midnight "
                "is two windows (22:00-24:00, and 00:00-02:00 on the next days)."
            )
        picked = sorted({str(d).lower()[:3] for d in days}, key=DAYS.index)
        return {"kind": "weekly", "days": picked, "start": f"{start:%H:%M}", "end": f"{end:%H:%M}", "tz": zone.key}
    raise WindowError(f"Unknown window kind {str(kind)[:20]!r}: once or weekly.")


def parse_line(line):
    """A window typed in the page: ``once 2026-12-05 02:00-04:00 Europe/Paris``, ``weekly sat,sun 02:00-04:00
    Europe/Paris``, ``daily 02:00-04:00 UTC``."""
    parts = line.split()
    if len(parts) == 4 and parts[0].lower() == "once" and "T" in parts[1]:  # once 2026-12-05T22:00 2026-12-06T02:00 UTC
        return clean_window({"kind": "once", "start": parts[1], "end": parts[2], "tz": parts[3]})
    if len(parts) == 4 and parts[0].lower() == "once":
        times = parts[2].split("-")
        if len(times) != 2:
            raise WindowError(f"{line!r}: write the times as HH:MM-HH:MM.")
        return clean_window(
            {"kind": "once", "start": f"{parts[1]}T{times[0]}", "end": f"{parts[1]}T{times[1]}", "tz": parts[3]}
        )
    if len(parts) in (3, 4) and parts[0].lower() in ("weekly", "daily"):
        days = list(DAYS) if parts[0].lower() == "daily" else parts[1].split(",")
        span, tz = parts[-2].split("-"), parts[-1]
        if len(span) != 2 or (parts[0].lower() == "weekly") != (len(parts) == 4):
            raise WindowError(f"{line!r}: write 'weekly mon,tue 02:00-04:00 Europe/Paris' or 'daily 02:00-04:00 UTC'.")
        end = "00:00" if span[1] in ("24:00", "24") else span[1]
        return clean_window({"kind": "weekly", "days": days, "start": span[0], "end": end, "tz": tz})
    raise WindowError(
        f"{line[:80]!r} is not a window: write 'once 2026-12-05 02:00-04:00 Europe/Paris', "
        "'weekly sat,sun 02:00-04:00 Europe/Paris' or 'daily 02:00-04:00 UTC'."
    )


def as_line(window):
    """A stored window as the page's line (the form shows the windows set)."""
    if window["kind"] == "once":
        start, end = window["start"].split("T"), window["end"].split("T")
        if start[0] == end[0]:
            return f"once {start[0]} {start[1]}-{end[1]} {window['tz']}"
        return f"once {window['start']} {window['end']} {window['tz']}"
    days = "daily" if len(window["days"]) == 7 else f"weekly {','.join(window['days'])}"
    end = "24:00" if window["end"] == "00:00" else window["end"]
    return f"{days} {window['start']}-{end} {window['tz']}"


# -- when they occur ------------------------------------------------------------------------------------


def _instant(wall, zone):
    """The UTC instant of the wall-clock time ``wall`` (naive) in ``zone``. A time the clock repeats (autumn)
    is its first pass; a time the clock skips (spring) is the moment it jumps, so a window never opens
    before its wall-clock start nor ends before it opens."""
    first = wall.replace(tzinfo=zone).astimezone(UTC)  # fold=0: for a skipped time, the offset before the jump
    if first.astimezone(zone).replace(tzinfo=None) == wall:
        return first
    lo = int(wall.replace(tzinfo=zone, fold=1).astimezone(UTC).timestamp())  # before the jump
    hi = int(first.timestamp())  # after it
    while hi - lo > 1:  # the first second whose wall-clock time is at or past ``wall``: the jump
        mid = (lo + hi) // 2
        if datetime.fromtimestamp(mid, zone).replace(tzinfo=None) >= wall:
            hi = mid
        else:
            lo = mid
    return datetime.fromtimestamp(hi, UTC)


def _spans(window, after, before):
    """The occurrences of one window that overlap [after, before). On a day when the clock skips part of a
    window it is shorter, and skipped whole it does not occur."""
    zone = ZoneInfo(window["tz"])
    if window["kind"] == "once":
        candidates = [(datetime.fromisoformat(window["start"]), datetime.fromisoformat(window["end"]))]
    else:
        first, last = after.astimezone(zone).date() - timedelta(days=1), before.astimezone(zone).date()
        start_t, end_t = time.fromisoformat(window["start"]), time.fromisoformat(window["end"])
        midnight = end_t == time(0)  # the end of the day
        candidates = [
            (datetime.combine(day, start_t), datetime.combine(day + timedelta(days=midnight), end_t))
            for day in (first + timedelta(days=n) for n in range((last - first).days + 1))
            if DAYS[day.weekday()] in window["days"]
        ]
    for start, end in candidates:
        start, end = _instant(start, zone), _instant(end, zone)
        if start < end and start < before and end > after:
            yield Occurrence(start, end, window)


def occurrences(windows, after, before):
    return sorted((o for w in windows for o in _spans(w, after, before)), key=lambda o: (o.start, o.end))


def open_window(windows, now):
    """The occurrence ``now`` is inside (the one ending last when several overlap), or None."""
    inside = [o for o in occurrences(windows, now, now + timedelta(seconds=1)) if o.start <= now < o.end]
    return max(inside, key=lambda o: o.end, default=None)


def next_window(windows, now):
    """The first occurrence that starts after ``now`` (weekly ones within a week, one-off ones at any time)."""
    later = [o for o in occurrences(windows, now, now + timedelta(days=8)) if o.start > now]
    forever = datetime.max.replace(tzinfo=UTC)
    later += [o for w in windows if w["kind"] == "once" for o in _spans(w, now, forever) if o.start > now]
    return min(later, key=lambda o: o.start, default=None)


def catchup_every(session, now):
    """How often catch-ups run: FAILBACK_CATCHUP_MINUTES, shorter as a window nears (a quarter of the time
    left), every minute inside one, so the final delta is as small as it can be when the window opens."""
    default = timedelta(minutes=settings.FAILBACK_CATCHUP_MINUTES)
    windows, _ = rules(session)
    if not windows:
        return default
    if open_window(windows, now) is not None:
        return timedelta(minutes=1)
    coming = next_window(windows, now)
    if coming is None:
        return default
    return max(timedelta(minutes=1), min(default, (coming.start - now) / 4))


# -- whether the downtime fits, and why not ----------------------------------------------------------


def rules(session):
    """(windows, budget) that govern this session's switch: its plan's for a plan member, else its own."""
    owner = session.plan if session.plan_id else session
    return owner.switch_windows or [], owner.downtime_budget_s


def gated(owner):
    """Whether a session's or plan's automatic switch waits for a window or a budget."""
    return owner.switch_mode == SwitchMode.AUTO and bool(owner.switch_windows or owner.downtime_budget_s is not None)


def seconds(value):
    return f"{value:.0f} s" if value >= 10 else f"{value:.1f} s"


def fits(predicted, budget):
    return budget is None or (predicted is not None and predicted <= budget)


def why_not(predicted, budget, forecast=None, converging=None):
    """Why a switch now would not fit, in the words the page, the audit trail and the notification use."""
    if predicted is None:
        return "no predicted downtime yet (the readiness job predicts it every minute once phase 1 is done)"
    text = f"predicted {seconds(predicted)} against a budget of {budget} s"
    if forecast and forecast.get("shutdown_s") is not None:
        text += (
            f" (guest shutdown {seconds(forecast['shutdown_s'])}, final delta and verification "
            f"{seconds(forecast.get('data_s') or 0)}, power-on {seconds(forecast.get('power_on_s') or 0)})"
        )
    if converging:
        text += f"; {converging['text']}"
    return text


def _rate(bps):
    return f"{bps / 1e6:.1f} MB/s"


def copy_rate(session):
    """The rate the copy moves changes at: phase 1's measured rate, or the session's bandwidth limit if lower."""
    base = (session.prediction or {}).get("base") or {}
    # a phase 1 that copied little measured its overhead, not a rate (as prediction.learn's 8 MiB)
    measured = base.get("write_bps") if (base.get("allocated_bytes") or 0) >= MIN_RATE_BYTES else None
    limit = session.bandwidth_mbps * 1_000_000 if session.bandwidth_mbps else None
    if limit and (not measured or limit < measured):
        return float(limit), "the session's bandwidth limit"
    if measured:
        return float(measured), "measured in phase 1"
    return None, ""


def convergence(session, forecast, now):
    """Writes outpacing the copy: the bytes changed on the replica per second, against the copy rate. None when
    they do not, or when nothing says (too little change, no rate). A change-tracked disk's rate is its
    changed bytes since the production disks were last brought up to date (phase 1's start, or the last
    catch-up), over the time since; a digest disk's is what its last catch-up pass found changed, over the time
    since the pass before it began (``disk_rates``)."""
    copy_bps, basis = copy_rate(session)
    if not copy_bps:
        return None
    disks = sorted(disk_rates(session, forecast, now), key=lambda d: -d["write_bps"])
    written = sum(d["changed_bytes"] for d in disks)
    write_bps = sum(d["write_bps"] for d in disks)
    if written < MIN_PENDING_BYTES or write_bps < copy_bps:
        return None
    names = [d["disk"] for d in disks]
    return {
        "write_bps": round(write_bps),
        "copy_bps": round(copy_bps),
        "copy_basis": basis,
        "since": min(d["since"] for d in disks),
        "changed_bytes": written,
        "disks": [{**d, "write_bps": round(d["write_bps"])} for d in disks],
        "text": f"the write rate on disk{'s' if len(names) > 1 else ''} {', '.join(names)} ({_rate(write_bps)}) is "
        f"outpacing the copy rate ({_rate(copy_bps)}, {basis}): the delta will not shrink",
    }


def disk_rates(session, forecast, now):
    """Each disk's measured write rate: its changed bytes, over how long, and how that was measured."""
    since = session.catchup_at or session.phase1_started_at
    last = (session.prediction or {}).get("catchup") or {}
    out = []
    for d in forecast.get("disks", []):
        key = d["disk"]
        if d.get("method") == "tracked" and d.get("pending_bytes") and since is not None:
            seconds, changed, start = max((now - since).total_seconds(), 1.0), d["pending_bytes"], since
            how = "change tracking"
        elif d.get("method") == "digest" and last.get("methods", {}).get(key) == "digest" and last["written"].get(key):
            start = datetime.fromisoformat(last["since"])
            seconds = max((datetime.fromisoformat(last["started_at"]) - start).total_seconds(), 1.0)
            changed = last["written"][key]
            pass_s = (
                datetime.fromisoformat(last["ended_at"]) - datetime.fromisoformat(last["started_at"])
            ).total_seconds()
            how = (
                f"the last digest catch-up: {changed / 2**20:.1f} MiB changed in {seconds:.0f} s, a {pass_s:.0f} s pass"
            )
        else:
            continue
        out.append(
            {"disk": key, "method": d["method"], "changed_bytes": changed, "seconds": round(seconds, 1),
             "since": start.isoformat(), "write_bps": changed / seconds, "measured_by": how}
        )  # fmt: skip
    return out


def warn_convergence(session, found):
    """Audited (and so told) once while the same disks outpace the copy; said again if it stops and comes back."""
    told = (session.window_state or {}).get("convergence")
    now_key = ",".join(d["disk"] for d in found["disks"]) if found else None
    if now_key == told:
        return None
    remember(session, convergence=now_key)
    if found is None:
        return None
    with transaction.atomic():
        return audit(
            action="convergence_warning",
            outcome=Outcome.INFO,
            session=session,
            from_state=session.status,
            to_state=session.status,
            detail=f"Writes outpace the copy on failback #{session.pk}: {found['text']}. A switch now would still "
            "work, but catch-ups cannot shrink its downtime; lower the guest's writes or switch when it is quiet.",
            data=found,
        )


def remember(owner, **changes):
    """Merge ``changes`` into a session's or plan's ``window_state``, under its row lock."""
    with transaction.atomic():
        row = type(owner).objects.select_for_update().get(pk=owner.pk)
        row.window_state = {**(row.window_state or {}), **changes}
        row.save(update_fields=["window_state"])
    owner.window_state = row.window_state
    return row.window_state


def summary(owner, now=None, *, predicted=None, forecast=None, converging=None):
    """What the page and the API show: the windows, the budget, the window open or next, and why it waits."""
    now = now or timezone.now()
    windows, budget = owner.switch_windows or [], owner.downtime_budget_s
    if not gated(owner):
        return None  # none set, or the switch was made manual or scheduled since
    current = open_window(windows, now) if windows else None
    coming = next_window(windows, now) if windows else None
    state = owner.window_state or {}
    return {
        "windows": windows,
        "lines": [as_line(w) for w in windows],
        "budget_s": budget,
        "open": current.as_dict() if current else None,
        "next": coming.as_dict() if coming else None,
        "predicted_s": predicted,
        "fits": fits(predicted, budget),
        "why_not": None if fits(predicted, budget) else why_not(predicted, budget, forecast, converging),
        "last_missed": state.get("last_missed"),
        "none_left": bool(windows) and current is None and coming is None,
    }


def session_summary(session, now=None):
    data = session.prediction or {}
    if session.plan_id:
        return None  # a member shows its plan's windows on the plan's page
    return summary(
        session,
        now,
        predicted=session.predicted_window_s,
        forecast=data.get("now"),
        converging=data.get("convergence"),
    )


def plan_predicted(plan, members):
    """Members switch one after the other: the plan's downtime is the sum of the Ready members' predictions
    plus the power-on delays (the plan page's figure too; None while one has no prediction)."""
    figures = [s.predicted_window_s for s in members if s.status == "ready_to_switch"]
    if not figures or any(f is None for f in figures):
        return None
    return sum(figures) + plan.power_on_delay_s * (len(figures) - 1)


def plan_converging(members):
    """The first live member whose writes outpace its copy, said for the plan."""
    for s in members:
        found = (s.prediction or {}).get("convergence") if s.status == "ready_to_switch" else None
        if found:
            return {**found, "text": f"{s.replica.name}: {found['text']}"}
    return None


def plan_summary(plan, members, now=None):
    return summary(plan, now, predicted=plan_predicted(plan, members), converging=plan_converging(members))


# -- setting them (a user action) -------------------------------------------------------------------


def clean_rules(windows, budget_s, *, actor, **where):
    """Windows and budget as stored, or a refusal saying what is wrong (audited)."""
    if not isinstance(windows, list) or len(windows) > MAX_WINDOWS:
        refuse(f"Windows refused: give a list of at most {MAX_WINDOWS} windows.", action=ACTION, actor=actor, **where)
    cleaned = []
    for i, raw in enumerate(windows, 1):
        try:
            cleaned.append(clean_window(raw))
        except WindowError as bad:
            refuse(f"Window {i} refused: {bad}", action=ACTION, actor=actor, **where)
    if budget_s is not None and (isinstance(budget_s, bool) or not isinstance(budget_s, int) or budget_s < 1):
        refuse(
            f"Downtime budget refused: {budget_s!r} is not a positive number of seconds.",
            action=ACTION,
            actor=actor,
            **where,
        )
    if budget_s is not None and budget_s > MAX_BUDGET_S:
        refuse(f"Downtime budget refused: at most {MAX_BUDGET_S} s (a week).", action=ACTION, actor=actor, **where)
    return cleaned


def _described(windows, budget_s):
    if not windows and budget_s is None:
        return "no windows and no budget: the switch is manual again"
    where = "; ".join(as_line(w) for w in windows) if windows else "any time"
    fit = f"when the predicted downtime is at most {budget_s} s" if budget_s is not None else "whatever the downtime"
    return f"the switch starts in a window ({where}) {fit}"


def set_session_rules(actor, session_id, *, windows, budget_s=None, reason=""):
    """Give a session maintenance windows and a downtime budget (or clear them): its switch becomes automatic,
    at the first moment inside a window when the predicted downtime fits. Legal until the switch begins."""
    from .models import FailbackSession
    from .schedules import drop_switch_schedule

    require_operator(actor, ACTION, session=session_id)
    session = FailbackSession.objects.select_related("plan").filter(pk=session_id).first()
    if session is None:
        refuse(f"Windows refused: there is no failback #{session_id}.", action=ACTION, actor=actor)
    if session.plan_id:
        refuse(
            f"Windows refused: failback #{session.pk} belongs to plan {session.plan.name}; set the plan's windows.",
            action=ACTION,
            actor=actor,
            session=session,
            from_state=session.status,
        )
    reason = clean_reason(reason, action=ACTION, actor=actor, session=session)
    cleaned = clean_rules(windows, budget_s, actor=actor, session=session)
    with transaction.atomic():
        row = FailbackSession.objects.select_for_update().get(pk=session.pk)
        if row.status in SCHEDULABLE:
            before = _rules_of(row)
            _apply(row, cleaned, budget_s)
            row.save(update_fields=["switch_windows", "downtime_budget_s", "switch_mode", "switch_at", "window_state"])
            drop_switch_schedule(row.pk)
            audit(
                action=ACTION,
                actor=actor,
                session=row,
                from_state=row.status,
                to_state=row.status,
                detail=f"Maintenance windows set: {_described(cleaned, budget_s)}{': ' + reason if reason else ''}",
                data={"before": before, "after": _rules_of(row), "reason": reason},
            )
            broadcast.session_changed(row.pk)
            return row
    refuse(
        f"Windows refused: failback #{session.pk} is {session.get_status_display()}; windows can change only "
        "before the switch begins.",
        action=ACTION,
        actor=actor,
        session=session,
        from_state=session.status,
    )


def _rules_of(owner):
    return {
        "switch_mode": owner.switch_mode,
        "switch_at": owner.switch_at.isoformat() if owner.switch_at else None,
        "switch_windows": owner.switch_windows,
        "downtime_budget_s": owner.downtime_budget_s,
    }


def _apply(owner, windows, budget_s):
    owner.switch_windows, owner.downtime_budget_s = windows, budget_s
    owner.switch_mode = SwitchMode.AUTO if windows or budget_s is not None else SwitchMode.MANUAL
    owner.switch_at = None
    owner.window_state = {"since": timezone.now().isoformat()}  # windows before this one are not "missed"


def set_plan_rules(actor, plan_id, *, windows, budget_s=None, reason=""):
    """The same for a plan: its switch (every member, in order) waits for a window where every member's
    predicted downtime fits the budget. Legal until the plan switches."""
    from .models import FailbackPlan
    from .plans import OUT_OF_PLAY
    from .schedules import drop_plan_schedule

    require_operator(actor, ACTION)
    plan = FailbackPlan.objects.filter(pk=plan_id).first()
    if plan is None:
        refuse(f"Windows refused: there is no plan #{plan_id}.", action=ACTION, actor=actor)
    reason = clean_reason(reason, action=ACTION, actor=actor, data={"plan_id": plan.pk})
    cleaned = clean_rules(windows, budget_s, actor=actor, data={"plan_id": plan.pk})
    with transaction.atomic():
        row = FailbackPlan.objects.select_for_update().get(pk=plan.pk)
        if row.switch_started_at is None:
            before = _rules_of(row)
            _apply(row, cleaned, budget_s)
            row.save(update_fields=["switch_windows", "downtime_budget_s", "switch_mode", "switch_at", "window_state"])
            row.sessions.exclude(status__in=OUT_OF_PLAY).update(switch_mode=row.switch_mode, switch_at=None)
            drop_plan_schedule(row.pk)
            audit(
                action=ACTION,
                actor=actor,
                detail=f"Plan {row.name}: maintenance windows set: {_described(cleaned, budget_s)}"
                + (f": {reason}" if reason else ""),
                data={"plan": row.name, "plan_id": row.pk, "before": before, "after": _rules_of(row), "reason": reason},
            )
            broadcast.plan_changed(row.pk)
            return row
    refuse(
        f"Windows refused: plan {plan.name} has already switched.",
        action=ACTION,
        actor=actor,
        data={"plan_id": plan.pk},
    )
