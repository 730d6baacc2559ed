"""The maintenance windows' rules on their own (no database): when they occur across time zones and DST, what the
page's lines mean, and how often catch-ups run as a window nears."""

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from failback import windows
from failback.models import FailbackSession

pytestmark = pytest.mark.beyond

PARIS_NIGHTS = {"kind": "weekly", "days": ["sat", "sun"], "start": "02:00", "end": "04:00", "tz": "Europe/Paris"}


def test_it_follows_the_zone_s_wall_clock_across_a_dst_change():
    # Paris leaves summer time on Sunday 2026-10-25 at 03:00: the window's hours are wall-clock hours.
    spans = windows.occurrences([PARIS_NIGHTS], datetime(2026, 10, 23, tzinfo=UTC), datetime(2026, 11, 2, tzinfo=UTC))
    assert [(o.start.isoformat(), o.end.isoformat()) for o in spans] == [
        ("2026-10-24T00:00:00+00:00", "2026-10-24T02:00:00+00:00"),  # Saturday, UTC+2
        ("2026-10-25T00:00:00+00:00", "2026-10-25T03:00:00+00:00"),  # the night the clocks go back: 3 hours
        ("2026-10-31T01:00:00+00:00", "2026-10-31T03:00:00+00:00"),  # Saturday, UTC+1
        ("2026-11-01T01:00:00+00:00", "2026-11-01T03:00:00+00:00"),
    ]
    assert spans[0].label == "Sat 2026-10-24 02:00–04:00 Europe/Paris"


def test_it_reads_the_page_s_lines_and_writes_them_back():
    for line in (
        "once 2026-12-05 02:00-04:00 Europe/Paris",
        "once 2026-12-05T22:00 2026-12-06T02:00 UTC",
        "weekly sat,sun 02:00-04:00 Europe/Paris",
        "daily 22:00-24:00 UTC",
    ):
        assert windows.as_line(windows.parse_line(line)) == line
    with pytest.raises(windows.WindowError, match="is not a window"):
        windows.parse_line("tonight 2-4")
    with pytest.raises(windows.WindowError, match="ends .* before it starts"):
        windows.parse_line("once 2026-12-05 04:00-02:00 UTC")


def test_a_window_ending_at_midnight_ends_at_the_end_of_its_day():
    (night,) = windows.occurrences(
        [windows.parse_line("weekly fri 22:00-24:00 UTC")],
        datetime(2026, 12, 4, tzinfo=UTC),
        datetime(2026, 12, 5, 12, tzinfo=UTC),
    )
    assert (night.start, night.end) == (datetime(2026, 12, 4, 22, tzinfo=UTC), datetime(2026, 12, 5, tzinfo=UTC))


def test_catch_ups_come_more_often_as_a_window_nears(settings):
    settings.FAILBACK_CATCHUP_MINUTES = 15
    session = FailbackSession(switch_windows=[windows.parse_line("once 2026-12-05 02:00-04:00 UTC")])
    at = lambda clock: datetime.fromisoformat(f"2026-12-0{clock}").replace(tzinfo=UTC)  # noqa: E731
    assert windows.catchup_every(session, at("4T12:00")) == timedelta(minutes=15)  # 14 h ahead
    assert windows.catchup_every(session, at("5T01:40")) == timedelta(minutes=5)  # a quarter of 20 min
    assert windows.catchup_every(session, at("5T01:59")) == timedelta(minutes=1)  # never under a minute
    assert windows.catchup_every(session, at("5T03:00")) == timedelta(minutes=1)  # inside: every tick
    assert windows.catchup_every(session, at("5T05:00")) == timedelta(minutes=15)  # none left
    assert windows.catchup_every(FailbackSession(), at("5T03:00")) == timedelta(minutes=15)  # no windows


moments = st.datetimes(min_value=datetime(2026, 1, 1), max_value=datetime(2028, 12, 31)).map(
    lambda d: d.replace(tzinfo=UTC)
)
weekly = st.builds(
    lambda days, start, length, tz: {
        "kind": "weekly",
        "days": sorted(days, key=windows.DAYS.index),
        "start": f"{start // 60:02d}:{start % 60:02d}",
        "end": f"{(start + length) // 60:02d}:{(start + length) % 60:02d}",
        "tz": tz,
    },
    st.sets(st.sampled_from(windows.DAYS), min_size=1),
    st.integers(0, 22 * 60),
    st.integers(1, 60),
    st.sampled_from(["UTC", "Europe/Paris", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe"]),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(weekly, min_size=1, max_size=3), moments)
def test_the_open_and_next_windows_agree_with_the_occurrences(rules, now):
    rules = [windows.clean_window(w) for w in rules]
    around = windows.occurrences(rules, now - timedelta(days=9), now + timedelta(days=9))
    open_now = windows.open_window(rules, now)
    assert (open_now is not None) == any(o.start <= now < o.end for o in around)
    coming = windows.next_window(rules, now)
    later = [o for o in around if o.start > now]
    assert coming is not None and coming.start == min(o.start for o in later)  # a weekly window comes within 8 days
    assert all(o.end > o.start for o in around)


def test_a_window_the_clock_skips_is_shorter_that_day_or_absent():
    """New York skips 02:00-03:00 on 8 March 2026: a window from 02:30 opens when the clock jumps, at
    03:00 EDT; a window wholly inside the skipped hour does not occur that day; the next Sunday is whole.
    (Hypothesis found the window that ended before it opened.)"""
    rule = lambda start, end: windows.clean_window(  # noqa: E731
        {"kind": "weekly", "days": ["sun"], "start": start, "end": end, "tz": "America/New_York"}
    )
    around = lambda rule: windows.occurrences(  # noqa: E731
        [rule], datetime(2026, 3, 7, tzinfo=UTC), datetime(2026, 3, 16, tzinfo=UTC)
    )
    spans = [(o.start, o.end) for o in around(rule("02:30", "03:30"))]
    assert spans == [
        (datetime(2026, 3, 8, 7, 0, tzinfo=UTC), datetime(2026, 3, 8, 7, 30, tzinfo=UTC)),
        (datetime(2026, 3, 15, 6, 30, tzinfo=UTC), datetime(2026, 3, 15, 7, 30, tzinfo=UTC)),
    ]
    assert [o.start.day for o in around(rule("02:59", "03:00"))] == [15]
    # Autumn: 01:30 comes twice on 1 November 2026; the window opens on the first pass.
    autumn = windows.occurrences(
        [rule("01:30", "02:30")], datetime(2026, 10, 31, tzinfo=UTC), datetime(2026, 11, 2, tzinfo=UTC)
    )
    assert [(o.start, o.end) for o in autumn] == [
        (datetime(2026, 11, 1, 5, 30, tzinfo=UTC), datetime(2026, 11, 1, 7, 30, tzinfo=UTC))
    ]
