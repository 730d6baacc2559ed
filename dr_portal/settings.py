"""Settings for the failback portal: all of them from the environment, failing fast on bad values.

Embedded default (nothing set): SQLite under var/, django-q2's ORM broker, a SQLite channel layer
that works across processes. Production profile: DATABASE_URL (PostgreSQL) and REDIS_URL (Redis
channel layer and django-q2 broker). Every variable is read through the typed helpers in env.py and
listed in README.md's configuration table (tests/test_settings_env.py checks both).
"""

import os
import re
import secrets
import zoneinfo
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from .env import LOG_LEVELS, env_bool, env_choice, env_float, env_int, env_list, env_path, env_str, env_url

BASE_DIR = Path(__file__).resolve().parent.parent

VAR_DIR = env_path("DR_PORTAL_VAR", BASE_DIR / "var").resolve()
VAR_DIR.mkdir(parents=True, exist_ok=True)

DEBUG = env_bool("DJANGO_DEBUG", False)


def _secret_key():
    key = env_str("DJANGO_SECRET_KEY", secret=True)
    if key:
        return key
    # Dev convenience: generated once, kept in var/ (ignored by git), readable by the owner only.
    path = VAR_DIR / "secret_key"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(50))
    return path.read_text().strip()


SECRET_KEY = _secret_key()


def _credentials_keys():
    """Fernet keys for credentials at rest: from the environment, or generated once into var/ in dev."""
    keys = env_list("FAILBACK_CREDENTIALS_KEYS")
    if not keys:
        path = VAR_DIR / "credentials_key"
        if not path.exists():
            from cryptography.fernet import Fernet

            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(Fernet.generate_key().decode())
        keys = [k.strip() for k in path.read_text().split(",") if k.strip()]
    try:
        from cryptography.fernet import Fernet

        for key in keys:
            Fernet(key)
    except ValueError:
        raise ImproperlyConfigured(
            "FAILBACK_CREDENTIALS_KEYS must be comma-separated Fernet keys (32 url-safe base64 bytes each)"
        ) from None
    return keys


FAILBACK_CREDENTIALS_KEYS = _credentials_keys()


def _evidence_key():
    """The Ed25519 key that signs evidence files (32 url-safe base64 bytes): from the environment, or
    generated once into var/ in dev. Auditors check a file against its public key, shown in the portal."""
    import base64

    key = env_str("FAILBACK_EVIDENCE_KEY", secret=True)
    if not key:
        path = VAR_DIR / "evidence_key"
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(base64.urlsafe_b64encode(secrets.token_bytes(32)).decode())
        key = path.read_text().strip()
    try:
        if len(base64.urlsafe_b64decode(key.encode())) != 32:
            raise ValueError
    except ValueError:
        raise ImproperlyConfigured("FAILBACK_EVIDENCE_KEY must be an Ed25519 private key: 32 url-safe base64 bytes")
    return key


FAILBACK_EVIDENCE_KEY = _evidence_key()
# The allow-list of hook commands (TOML, see failback/hooks.py): kept by the machine's administrator, outside
# anything the portal writes; a failback only names hooks from it. Unset: no hooks.
FAILBACK_HOOKS_FILE = env_str("FAILBACK_HOOKS_FILE", "")
# Four eyes: how long a request for approval waits for a second person before it expires (approvals.py).
# A filtered audit page counts its matches up to this many (each page then stays as fast as a short list);
# past it the pages stop and say so: narrow the filter, or export the whole filtered set.
FAILBACK_AUDIT_COUNT_LIMIT = env_int("FAILBACK_AUDIT_COUNT_LIMIT", 10000, min=100, max=10_000_000, unit="rows")
FAILBACK_APPROVAL_MINUTES = env_int("FAILBACK_APPROVAL_MINUTES", 240, min=1, max=7 * 24 * 60, unit="minutes")
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS")

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "django_htmx",
    "django_q",
    "axes",
    "ninja",  # the API docs page serves its Swagger UI from ninja's static files, not a CDN
    "failback",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.auth.middleware.LoginRequiredMiddleware",  # every page needs a login; login views opt out
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "csp.middleware.CSPMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "axes.middleware.AxesMiddleware",  # last, as django-axes asks
]

ROOT_URLCONF = "dr_portal.urls"
ASGI_APPLICATION = "dr_portal.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# -- databases ---------------------------------------------------------------------------------
SQLITE_OPTIONS = {
    # IMMEDIATE: every transaction takes the write lock at BEGIN, so concurrent transitions queue
    # instead of failing with "database is locked" on upgrade.
    "transaction_mode": "IMMEDIATE",
    "timeout": 30,
    "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=30000;",
}

DATABASE_URL = env_url("DATABASE_URL", form="a database URL such as postgres://user@127.0.0.1:5432/dr_portal")
if DATABASE_URL:
    try:
        DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=0)}
    except Exception as exc:  # dj_database_url raises several types for a bad URL
        raise ImproperlyConfigured(f"DATABASE_URL is not a valid database URL: {exc}") from None
else:
    DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": VAR_DIR / "db.sqlite3"}}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    DATABASES["default"]["OPTIONS"] = {**SQLITE_OPTIONS, **DATABASES["default"].get("OPTIONS", {})}
    # Tests share the database with real worker processes, so it must be a file, not :memory:.
    # One file per test run (process), so two runs on one machine do not share it.
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / f"test-db-{os.getpid()}.sqlite3")}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# -- channels and django-q2 --------------------------------------------------------------------
REDIS_URL = env_url("REDIS_URL", schemes=("redis", "rediss", "unix"))
# Parallel test workers (pytest-xdist sets PYTEST_XDIST_WORKER=gwN, and the processes a test starts inherit
# it) each use their own Redis database, the URL's number + N: one worker's qcluster never takes another's
# tasks. Outside a parallel test run the variable is not set and the URL is used as given.
XDIST_WORKER = env_str("PYTEST_XDIST_WORKER", "", check=lambda v: re.fullmatch(r"gw\d+", v), form="gwN")
if REDIS_URL and XDIST_WORKER and urlsplit(REDIS_URL).scheme != "unix":
    _url = urlsplit(REDIS_URL)
    REDIS_URL = urlunsplit(_url._replace(path=f"/{int(_url.path.strip('/') or 0) + int(XDIST_WORKER[2:])}"))
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            # redis-py 8 reads with a 5 s socket timeout by default, as long as the layer's blocking
            # receive waits (BZPOPMIN, 5 s): every websocket idle for 5 s was closed with 1011.
            "CONFIG": {"hosts": [{"address": REDIS_URL, "socket_timeout": 15}], "capacity": 500, "expiry": 30},
        }
    }
else:
    # Embedded: a channel layer in its own SQLite file, shared by the web and worker processes.
    DATABASES["channels"] = {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": env_path("CHANNELS_DB_PATH", VAR_DIR / "channels.sqlite3"),
        "OPTIONS": dict(SQLITE_OPTIONS),
        "TEST": {"NAME": str(VAR_DIR / f"test-channels-{os.getpid()}.sqlite3")},
    }
    DATABASE_ROUTERS = ["channels_lite.router.ChannelsRouter"]
    INSTALLED_APPS.append("channels_lite")
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_lite.layers.core.SQLiteChannelLayer",
            "CONFIG": {"database": "channels", "expiry": 30, "capacity": 500, "polling_interval": 0.05},
        }
    }

# The cache holds short-lived counters only (failed logins per address, failback/logins.py): in Redis when
# there is one, so that every web process counts together; else in the process's memory.
if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": "dr_portal",
        }
    }

TASK_TIMEOUT = env_int("FAILBACK_TASK_TIMEOUT", 6 * 3600, min=60, unit="seconds")
Q_CLUSTER = {
    "name": "dr_portal",
    "workers": env_int("Q_WORKERS", 2, min=1),
    "timeout": TASK_TIMEOUT,
    "retry": TASK_TIMEOUT + 600,  # retry must exceed timeout, or a long phase 1 is delivered twice
    "max_attempts": 1,  # a failed step is recorded and shown, never silently re-run
    "ack_failures": True,
    "catch_up": False,
    "save_limit": 1000,
    "label": "Background tasks",
}
if REDIS_URL:
    Q_CLUSTER["redis"] = REDIS_URL
else:
    Q_CLUSTER["orm"] = "default"
    Q_CLUSTER["poll"] = 0.5

# -- failback ----------------------------------------------------------------------------------
LAB_ROOT = env_path("LAB_ROOT", VAR_DIR / "lab")
FAILBACK_STATE_DIR = env_path("FAILBACK_STATE_DIR", VAR_DIR / "sessions")
# The nbd transport (failback/jobs/nbd.py): how the lab's disks are reached (direct: opened as files; nbd:
# served by nbdkit and reached over NBD), where the worker's nbdkit listens (a directory holding
# ca-cert.pem, server-cert.pem and server-key.pem: TLS on 127.0.0.1; empty: a Unix socket), and the VDDK
# library for vSphere's vddk plugin (empty: the file plugin on a mounted datastore; see README).
LAB_TRANSPORT = env_choice("LAB_TRANSPORT", "direct", ("direct", "nbd"))
FAILBACK_NBD_TLS_DIR = env_str("FAILBACK_NBD_TLS_DIR")
FAILBACK_VDDK_LIBDIR = env_str("FAILBACK_VDDK_LIBDIR")
FAILBACK_NBDKIT = env_str("FAILBACK_NBDKIT", "nbdkit")
# Phase 2: how long a guest may take to shut down before it is powered off (DOMAIN: 15 minutes).
FAILBACK_SHUTDOWN_TIMEOUT = env_int("FAILBACK_SHUTDOWN_TIMEOUT", 15 * 60, min=1, unit="seconds")
# A running step that shows no sign of life for this long is queued again (it resumes from its checkpoint).
FAILBACK_STALL_SECONDS = env_int("FAILBACK_STALL_SECONDS", 120, min=2, unit="seconds")
# A running step renews its heartbeat (and so keeps its lease) this often, whatever it is doing: a slow
# step is not taken over; only a silent one (killed, paused, its machine gone) is. Keep it well under the above.
FAILBACK_HEARTBEAT_SECONDS = env_float("FAILBACK_HEARTBEAT_SECONDS", 10.0, above=0, unit="seconds")
if not FAILBACK_HEARTBEAT_SECONDS < FAILBACK_STALL_SECONDS:
    raise ImproperlyConfigured(
        f"FAILBACK_HEARTBEAT_SECONDS must be below FAILBACK_STALL_SECONDS ({FAILBACK_STALL_SECONDS}), "
        f"got {FAILBACK_HEARTBEAT_SECONDS:g}"
    )
# vCenter calls: socket timeout (seconds) and retries of a call that failed on the network (see vsphere.py).
FAILBACK_VSPHERE_TIMEOUT = env_int("FAILBACK_VSPHERE_TIMEOUT", 30, min=1, unit="seconds")
FAILBACK_VSPHERE_RETRIES = env_int("FAILBACK_VSPHERE_RETRIES", 3, min=0)
# Progress is saved and broadcast at most this often per disk being copied (seconds).
FAILBACK_PROGRESS_INTERVAL = env_float("FAILBACK_PROGRESS_INTERVAL", 0.5, min=0, unit="seconds")
# Ready to switch: a background catch-up sync this often keeps the pending delta (and the switch window) small.
FAILBACK_CATCHUP_MINUTES = env_int("FAILBACK_CATCHUP_MINUTES", 5, min=1, unit="minutes")
# Disks of one VM sent side by side in the switch's final delta and proof and in a catch-up sync (jobs/disks.py).
FAILBACK_DISK_THREADS = env_int("FAILBACK_DISK_THREADS", 2, min=1)
# Switch window prediction before this VM's first switch measured them (vSphere; the lab knows its guests).
FAILBACK_PREDICT_SHUTDOWN_S = env_int("FAILBACK_PREDICT_SHUTDOWN_S", 60, min=0, unit="seconds")
FAILBACK_PREDICT_POWER_ON_S = env_int("FAILBACK_PREDICT_POWER_ON_S", 5, min=0, unit="seconds")
# Pre-failback check: the scheduler's clock may differ from the web server's by at most this.
FAILBACK_MAX_CLOCK_SKEW_S = env_int("FAILBACK_MAX_CLOCK_SKEW_S", 30, min=1, unit="seconds")

# -- notifications (failback/notifications/) ----------------------------------------------------
# E-mail goes out through Django's SMTP backend with these; webhooks are signed POSTs from the worker.
EMAIL_HOST = env_str("EMAIL_HOST", "localhost")
EMAIL_PORT = env_int("EMAIL_PORT", 25, min=1, max=65535)
EMAIL_HOST_USER = env_str("EMAIL_HOST_USER")
EMAIL_HOST_PASSWORD = env_str("EMAIL_HOST_PASSWORD", secret=True)
EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", False)
EMAIL_USE_SSL = env_bool("EMAIL_USE_SSL", False)
if EMAIL_USE_TLS and EMAIL_USE_SSL:
    raise ImproperlyConfigured("EMAIL_USE_TLS and EMAIL_USE_SSL cannot both be true")
EMAIL_TIMEOUT = env_int("EMAIL_TIMEOUT", 10, min=1, unit="seconds")
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", "dr-portal@localhost")
FAILBACK_NOTIFY_BASE_URL = env_url("FAILBACK_NOTIFY_BASE_URL", schemes=("http", "https"))  # links in messages
FAILBACK_WEBHOOK_TIMEOUT_S = env_float("FAILBACK_WEBHOOK_TIMEOUT_S", 10.0, above=0, unit="seconds")
FAILBACK_NOTIFY_ATTEMPTS = env_int("FAILBACK_NOTIFY_ATTEMPTS", 6, min=1)
FAILBACK_NOTIFY_RETRY_S = env_float("FAILBACK_NOTIFY_RETRY_S", 30.0, above=0, unit="seconds")  # doubles each time
FAILBACK_NOTIFY_WAITING_MINUTES = env_int("FAILBACK_NOTIFY_WAITING_MINUTES", 60, min=1, unit="minutes")
FAILBACK_NOTIFY_POLICY_MINUTES = env_int("FAILBACK_NOTIFY_POLICY_MINUTES", 15, min=1, unit="minutes")

# -- health and metrics (failback/health.py, failback/metrics.py) -------------------------------
# /readyz: the watchdog (queued by the scheduler every minute, run by a worker) must have run this recently.
FAILBACK_READY_WORKER_SECONDS = env_int("FAILBACK_READY_WORKER_SECONDS", 180, min=60, unit="seconds")
# /metrics answers a scrape that sends this bearer token, or that comes from one of these addresses or networks;
# with neither set it answers nobody.
FAILBACK_METRICS_TOKEN = env_str(
    "FAILBACK_METRICS_TOKEN", secret=True, check=lambda v: len(v) >= 16, form="16 characters or more"
)


def _networks(name, items):
    import ipaddress

    try:
        return [ipaddress.ip_network(item, strict=False) for item in items]
    except ValueError as exc:
        raise ImproperlyConfigured(
            f"{name} must be addresses or networks such as 127.0.0.1,10.0.0.0/8: {exc}"
        ) from None


FAILBACK_METRICS_ALLOW = _networks("FAILBACK_METRICS_ALLOW", env_list("FAILBACK_METRICS_ALLOW"))

# -- auth and security -------------------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator", "OPTIONS": {"min_length": 12}},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
# Login throttling (django-axes, see failback/logins.py): after AXES_FAILURE_LIMIT failures for a user name
# from an address, or LOGIN_ADDRESS_FAILURE_LIMIT from an address whatever names it tried (password spraying),
# it is locked out for AXES_COOLOFF_MINUTES. A successful login does not wipe the address's count (else one
# valid account would reset a spray). Failures and lock-outs are audited: per address and cool-off window,
# LOGIN_AUDIT_ROWS_PER_ADDRESS rows in full, then summary rows with the count (at 20, 50, 100, 200, …).
AUTHENTICATION_BACKENDS = ["axes.backends.AxesStandaloneBackend", "django.contrib.auth.backends.ModelBackend"]
LOGIN_FAILURE_LIMIT_PER_NAME = env_int("AXES_FAILURE_LIMIT", 5, min=1)
LOGIN_FAILURE_LIMIT_PER_ADDRESS = env_int("LOGIN_ADDRESS_FAILURE_LIMIT", 20, min=1)
LOGIN_AUDIT_ROWS_PER_ADDRESS = env_int("LOGIN_AUDIT_ROWS_PER_ADDRESS", 10, min=1)
AXES_FAILURE_LIMIT = "failback.logins.failure_limit"
AXES_COOLOFF_TIME = env_int("AXES_COOLOFF_MINUTES", 15, min=1, unit="minutes") / 60  # hours
LOGIN_AUDIT_WINDOW_S = round(AXES_COOLOFF_TIME * 3600)
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"], "ip_address"]
AXES_RESET_ON_SUCCESS = False
AXES_SENSITIVE_PARAMETERS = ["password"]

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "failback:dashboard"
LOGOUT_REDIRECT_URL = "login"

# Content-Security-Policy (django-csp): scripts and styles from our own static files only; no inline
# script, no inline style, no eval (htmx's hx-on and js: values would need it; the pages use neither, and
# base.html turns htmx's eval and injected indicator style off). Websockets are same-origin ('self').
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": ["'self'"],
        "script-src": ["'self'"],
        "style-src": ["'self'"],
        "img-src": ["'self'", "data:"],  # data: for the API docs' Swagger UI icons
        "connect-src": ["'self'"],
        "object-src": ["'none'"],
        "base-uri": ["'none'"],
        "form-action": ["'self'"],
        "frame-ancestors": ["'none'"],
    },
}

SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
CSRF_COOKIE_SAMESITE = "Lax"
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
HTTPS = env_bool("DJANGO_HTTPS", False)  # set behind TLS: secure cookies, HSTS, redirect
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = HTTPS
SECURE_SSL_REDIRECT = HTTPS
# HSTS behind TLS: a year by default; a team putting a new proxy in front starts with a day and raises it once
# the certificate is right, since browsers refuse plain HTTP to the host for that long. 0: no HSTS.
HSTS_DAYS = env_int("DJANGO_HSTS_DAYS", 365, min=0, unit="days")
SECURE_HSTS_SECONDS = HSTS_DAYS * 86400 if HTTPS else 0
SECURE_HSTS_INCLUDE_SUBDOMAINS = SECURE_HSTS_PRELOAD = HTTPS and HSTS_DAYS >= 365
# Probes and scrapes may come in plain HTTP from the machine or the proxy itself.
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
if HTTPS:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

# -- i18n, static ------------------------------------------------------------------------------
LANGUAGE_CODE = "en-us"
TIME_ZONE = env_str("TIME_ZONE", "UTC", check=zoneinfo.ZoneInfo, form="an IANA time zone name such as Europe/Paris")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = VAR_DIR / "static"
STATIC_ROOT.mkdir(exist_ok=True)
WHITENOISE_USE_FINDERS = True  # serve straight from the apps' static dirs; no collectstatic step

# LOG_FORMAT=json: one JSON object per line. Either way a line logged during a failback's step carries the
# session's id and the step's name (failback/logging_context.py).
LOG_FORMAT = env_choice("LOG_FORMAT", "plain", ("plain", "json"))
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"session": {"()": "failback.logging_context.SessionFilter"}},
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s%(context)s %(message)s"},
        "json": {"()": "failback.logging_context.JsonFormatter"},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": LOG_FORMAT, "filters": ["session"]}},
    "root": {"handlers": ["console"], "level": env_choice("LOG_LEVEL", "INFO", LOG_LEVELS, upper=True)},
    "loggers": {
        "django_q": {"level": "WARNING"},
        # django-axes logs "AXES: BEGIN version …" from axes.apps at start-up of every command; it logs nothing
        # else there (its lock-out messages come from axes.handlers and axes.helpers and stay).
        "axes.apps": {"level": "WARNING"},
        # django-health-check logs each failed probe with its traceback; /readyz logs one line per unready answer.
        "health_check": {"level": "ERROR"},
    },
}
