"""Typed readers for settings taken from the environment, one per kind of value.

Each returns the default when the variable is unset or blank, and otherwise refuses a bad value with an
ImproperlyConfigured that names the variable and the form it expects, so start-up stops on the first
mistake instead of failing later somewhere else. Every name read is recorded in READ (name -> default);
the README's configuration table is checked against the names the settings read.
"""

import logging
import math
import os
from pathlib import Path
from urllib.parse import urlsplit

from django.core.exceptions import ImproperlyConfigured

READ: dict[str, object] = {}

TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _raw(name, default):
    READ[name] = default
    return os.environ.get(name, "").strip()


def _refuse(name, form, value, secret=False):
    shown = "" if secret else f", got {value!r}"
    return ImproperlyConfigured(f"{name} must be {form}{shown}")


def env_str(name, default="", *, check=None, form="", secret=False):
    """A string; `check(value)` may refuse it (by returning False or raising ValueError or LookupError, as
    zoneinfo.ZoneInfo does); `form` says what is expected. A secret's value is never put in the message."""
    value = _raw(name, default)
    if not value:
        return default
    if check is not None:
        try:
            ok = check(value)
        except (ValueError, LookupError):
            ok = False
        if not ok:
            raise _refuse(name, form, value, secret)
    return value


def _bounds(min, max, above, unit):
    parts = [
        f"> {above:g}" if above is not None else "",
        f">= {min:g}" if min is not None else "",
        f"<= {max:g}" if max is not None else "",
    ]
    return " ".join(p for p in [unit, *parts] if p)


def _number(name, default, parse, kind, min, max, above, unit):
    value = _raw(name, default)
    if not value:
        return default
    form = f"{kind} {_bounds(min, max, above, unit)}".strip()
    try:
        number = parse(value)
    except ValueError:
        raise _refuse(name, form, value) from None
    if (
        not math.isfinite(number)
        or (above is not None and number <= above)
        or (min is not None and number < min)
        or (max is not None and number > max)
    ):
        raise _refuse(name, form, value)
    return number


def env_int(name, default, *, min=None, max=None, unit=""):
    """A whole number within [min, max], e.g. env_int("Q_WORKERS", 2, min=1)."""
    return _number(name, default, int, "a whole number of" if unit else "a whole number", min, max, None, unit)


def env_float(name, default, *, min=None, max=None, above=None, unit=""):
    """A finite number within [min, max] and, if given, strictly above `above`."""
    return _number(name, default, float, "a number of" if unit else "a number", min, max, above, unit)


def env_bool(name, default):
    value = _raw(name, default).lower()
    if not value:
        return default
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise _refuse(name, "true or false (or 1/0, yes/no, on/off)", value)


def env_list(name, default=""):
    """Comma-separated values, each stripped, empty ones dropped; `default` is written the same way."""
    return [item.strip() for item in (_raw(name, default) or default).split(",") if item.strip()]


def env_url(name, default="", *, schemes=None, form=""):
    """A URL with a scheme (one of `schemes`, if given) and something after it."""
    value = _raw(name, default)
    if not value:
        return default
    form = form or (
        f"a {' or '.join(s + '://' for s in schemes)} URL" if schemes else "a URL such as scheme://host/name"
    )
    parts = urlsplit(value)
    if not parts.scheme or "://" not in value or (schemes and parts.scheme not in schemes):
        raise _refuse(name, form, value)
    return value


def env_path(name, default):
    """A filesystem path (the default is used when unset)."""
    return Path(_raw(name, default) or default)


def env_choice(name, default, choices, *, upper=False):
    """One of `choices` (compared after upper-casing when `upper`)."""
    value = _raw(name, default)
    if not value:
        return default
    chosen = value.upper() if upper else value
    if chosen not in choices:
        raise _refuse(name, "one of " + ", ".join(choices), value)
    return chosen


# The names logging.config accepts for a level.
LOG_LEVELS = tuple(logging.getLevelNamesMapping())
