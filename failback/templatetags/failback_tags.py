from datetime import timedelta

from django import template

register = template.Library()


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


@register.filter
def rate(bps):
    if not bps:
        return "—"
    return f"{bps / 2**20:,.1f} MiB/s"
