"""/healthz and /readyz: what a load balancer or a monitoring system asks, without a login.

``/healthz`` says the process is alive and answers HTTP: it touches nothing else (no database, no
cache), so a node whose database is down is still alive and is not restarted for it.

``/readyz`` says the node can do its work: the database answers, the channel layer carries a message,
django-q2's broker answers, and a worker and the scheduler were seen recently. django-health-check runs
the probes (concurrently, each with its own time limit, an unexpected error logged here and shown as
a plain "unavailable"); the checks themselves are ours because the answer must say nothing an anonymous
caller should not learn (the package's database check repeats the driver's error, which names the server's
address and port) and because a probe that uses the ORM from the package's threads must close its
connection afterwards (one kept by such a thread would stay broken after a database restart).

"A worker and the scheduler seen": the scheduler queues the watchdog every minute and a worker runs it,
and the watchdog writes ``SchedulerClock`` (checks.record_scheduler_clock), in the database every node
shares. With Redis, django-q2's clusters also publish their ``Stat`` there every few seconds (it expires
after 3 s), so a cluster that died is missed at once; the embedded ORM broker keeps ``Stat`` in each
process's own memory, where another process cannot see it, so there the watchdog's row is the proof.
"""

import asyncio
import dataclasses
import datetime
import logging
import uuid

from django.conf import settings
from django.contrib.auth.decorators import login_not_required
from django.db import close_old_connections, connections
from django.http import JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from health_check.base import HealthCheck
from health_check.exceptions import ServiceUnavailable
from health_check.views import HealthCheckView

log = logging.getLogger(__name__)


def _database_work(work):
    """Run ``work()`` on a connection of its own, closed afterwards whatever happened."""
    close_old_connections()
    try:
        return work()
    finally:
        connections["default"].close()


@dataclasses.dataclass
class Database(HealthCheck):
    """The default database answers ``SELECT 1``."""

    def run(self):
        def select_one():
            with connections["default"].cursor() as cursor:
                cursor.execute("SELECT 1")
                return cursor.fetchone()

        try:
            answer = _database_work(select_one)
        except Exception as exc:
            raise ServiceUnavailable("unreachable") from exc
        if answer != (1,):
            raise ServiceUnavailable("unexpected answer")


@dataclasses.dataclass
class ChannelLayer(HealthCheck):
    """A message sent on the channel layer comes back: the websockets' live updates can travel."""

    timeout = datetime.timedelta(seconds=3)

    async def run(self):
        from channels.layers import get_channel_layer

        layer = get_channel_layer()
        try:
            channel = await layer.new_channel("health.")
            token = uuid.uuid4().hex
            await layer.send(channel, {"type": "health.ping", "token": token})
            message = await asyncio.wait_for(layer.receive(channel), self.timeout.total_seconds())
        except Exception as exc:
            raise ServiceUnavailable("unreachable") from exc
        if message.get("token") != token:
            raise ServiceUnavailable("unexpected answer")


@dataclasses.dataclass
class Broker(HealthCheck):
    """django-q2's broker answers: Redis pings back; the ORM broker is the database, asked as such."""

    def run(self):
        from django_q.brokers import get_broker

        if not settings.REDIS_URL:
            return Database().run()
        broker = get_broker()
        try:
            broker.connection.ping()
        except Exception as exc:
            raise ServiceUnavailable("unreachable") from exc
        finally:
            broker.connection.close()


def worker_silence_s():
    """Seconds since the watchdog last ran (the scheduler queued it and a worker ran it), None if never."""
    from django.db.models.functions import Now

    from .models import SchedulerClock

    seen = SchedulerClock.objects.annotate(now=Now()).order_by("-db_time").values_list("db_time", "now").first()
    if seen is None:
        return None
    return max(0.0, (seen[1] - seen[0]).total_seconds())


def live_clusters():
    """django-q2 clusters that published their status lately (Redis only: the ORM broker keeps it per process)."""
    from django_q.conf import Conf
    from django_q.status import Stat

    stats = Stat.get_all()
    return [s for s in stats if s.status not in (Conf.STOPPED, Conf.STOPPING)]


@dataclasses.dataclass
class Scheduler(HealthCheck):
    """The watchdog ran within FAILBACK_READY_WORKER_SECONDS, and with Redis a cluster is running now."""

    def run(self):
        try:
            silent = _database_work(worker_silence_s)
            clusters = live_clusters() if settings.REDIS_URL else None
        except Exception as exc:
            raise ServiceUnavailable("unreachable") from exc
        if silent is None:
            raise ServiceUnavailable("never seen")
        if silent > settings.FAILBACK_READY_WORKER_SECONDS:
            raise ServiceUnavailable(f"silent for {silent:.0f} s")
        if clusters is not None and not clusters:
            raise ServiceUnavailable("no cluster running")


# name -> check class: the names are what /readyz shows.
READINESS = {
    "database": Database,
    "channel_layer": ChannelLayer,
    "broker": Broker,
    "worker_and_scheduler": Scheduler,
}


class ReadyView(HealthCheckView):
    """Every check of READINESS, in JSON: 200 when all pass, 503 (not ready) when one fails."""

    checks = tuple(READINESS.values())

    async def get(self, request, *args, **kwargs):
        with self.get_executor() as executor:
            results = await asyncio.gather(*(check.get_result(executor) for check in self.get_checks()))
        names = {cls: name for name, cls in READINESS.items()}
        answers = {names[type(r.check)]: "ok" if r.error is None else r.error.message for r in results}
        failing = sorted(name for name, answer in answers.items() if answer != "ok")
        response = JsonResponse({"status": "unready" if failing else "ready", "checks": answers})
        if failing:
            log.warning("not ready: %s", ", ".join(f"{name} {answers[name]}" for name in failing))
            response.status_code = 503
            response._has_been_logged = True  # an answer, not a server error: Django need not log it again
        return response


@login_not_required
@never_cache
@require_GET
def healthz(request):
    """Alive: this process answers. Nothing else is touched."""
    return JsonResponse({"status": "alive"})


readyz = login_not_required(ReadyView.as_view())
