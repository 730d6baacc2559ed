"""Live progress under load (issue 6): websocket clients watching running failbacks, end to end.

Starts the portal on loopback as a site runs it: --web Daphne processes on their own ports and
--workers django-q2 clusters, on the production profile (PostgreSQL and Redis: a database of its own,
dr_portal_bench, and Redis db 8, both emptied before and after) or the embedded default (SQLite files in
a temporary directory). Builds a lab of --sessions replicas, each holding enough data that phase 1, at
the lowest bandwidth limit (1 MB/s), outlasts the measurement, and starts one failback per replica
through the workflow. Once --clients logged-in users (operators and viewers in turn, spread evenly over
sessions and web processes) are connected, it starts the workers and, when every failback is copying,
measures for --seconds.

Counting: one reference listener per session group, on the channel layer in this process, records
every nudge published (each carries an id and its publish time, see failback/broadcast.py); each
update a client receives names the nudges it answers (failback/consumers.py). delivered = nudges
received / nudges published for the client's session in the window, leaving out the last GRACE_S
seconds (still in flight when the clock stops); the clients get DRAIN_S more seconds to receive them.
p95_ms: publish (the worker's clock) to receipt (this process's clock; same machine). Errors: the logs
of every process started are scanned for tracebacks and database errors. CPU: per role over the
window, and "others": whatever else ran on the machine meanwhile.

Usage: .venv/bin/python bench/ws_load.py [--profile production|embedded] [--clients N] [--sessions N]
       [--seconds 60] [--web 2] [--workers 2]      (production defaults: 200 clients, 20 sessions;
                                                    embedded: 50 clients, 5 sessions)
Needs PostgreSQL on 127.0.0.1:5432 (user postgres, trust) and Redis on 127.0.0.1:6379 for the
production profile (tests/services.sh starts them). Everything started is stopped, and the temporary
directory removed, on exit and on Ctrl-C.
Last line: clients=<n> delivered=<fraction> p95_ms=<publish-to-receive p95>
"""

import argparse
import asyncio
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PG_SERVER = "postgres://postgres@127.0.0.1:5432"
PG_DATABASE = "dr_portal_bench"
REDIS_URL = "redis://127.0.0.1:6379/8"  # the test suite uses db 7
LIMIT_MB_S = 1  # the lowest bandwidth limit the workflow accepts
SETUP_MARGIN_S = 60  # phase 1 lasts this much longer than the window: start, connects, the window's end
GRACE_S = 2.0
DRAIN_S = 15.0  # after the window, how long the clients may take to receive what was published in it
STAMP = re.compile(r"<!-- nudge (\w+) sent ([\d.]+) -->")
DB_ERRORS = re.compile(
    r"OperationalError|InterfaceError|DatabaseError|IntegrityError|database is locked|psycopg\.errors|connection (?:refused|reset)"
)
PROFILES = {"production": (200, 20), "embedded": (50, 5)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", choices=PROFILES, default="production")
    parser.add_argument("--clients", type=int, help="websocket clients (production 200, embedded 50)")
    parser.add_argument("--sessions", type=int, help="running failbacks watched (production 20, embedded 5)")
    parser.add_argument("--seconds", type=float, default=60.0, help="measurement window")
    parser.add_argument("--web", type=int, default=2, help="Daphne processes")
    parser.add_argument("--workers", type=int, default=2, help="django-q2 clusters")
    args = parser.parse_args()
    default_clients, default_sessions = PROFILES[args.profile]
    args.clients = args.clients or default_clients
    args.sessions = args.sessions or default_sessions

    var = tempfile.mkdtemp(prefix="dr-wsload-", dir=ROOT / "var" if (ROOT / "var").exists() else None)
    bench = Bench(args, Path(var))
    signal.signal(signal.SIGTERM, interrupted)
    try:
        line = bench.run()
    finally:
        bench.clean_up()
    print(line)


def interrupted(*_):
    raise KeyboardInterrupt  # a kill cleans up as Ctrl-C does


class Bench:
    def __init__(self, args, var):
        self.args, self.var = args, var
        self.procs = {}  # name -> Popen, each the leader of its own process group
        self.database_created = False
        self.env = {
            **os.environ,
            "DR_PORTAL_VAR": str(var),
            "DJANGO_SETTINGS_MODULE": "dr_portal.settings",
            "LOG_LEVEL": "WARNING",
            "Q_WORKERS": str(args.sessions + 1),
        }  # any cluster may pick up every phase 1, plus the watchdog
        for name in (
            "DATABASE_URL",
            "REDIS_URL",
            "CHANNELS_DB_PATH",
            "LAB_ROOT",
            "FAILBACK_STATE_DIR",
            "FAILBACK_PROGRESS_INTERVAL",
        ):
            self.env.pop(name, None)
        if args.profile == "production":
            self.env.update(DATABASE_URL=f"{PG_SERVER}/{PG_DATABASE}", REDIS_URL=REDIS_URL)

    # -- set-up --------------------------------------------------------------------------------
    def run(self):
        args = self.args
        if args.profile == "production":
            self.reset_services()
        os.environ.clear()
        os.environ.update(self.env)
        import django

        django.setup()
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
        if args.profile == "embedded":
            call_command("migrate", database="channels", verbosity=0)
        data_mib = int((args.seconds + SETUP_MARGIN_S) * LIMIT_MB_S * 1e6 / 2**20) + 1
        started = time.monotonic()
        self.build_lab(data_mib)
        print(
            f"{args.profile} profile; lab of {args.sessions} replicas x {data_mib} MiB built in {time.monotonic() - started:.1f} s under {self.var}"
        )
        users = self.users()
        ports = [free_port() for _ in range(args.web)]
        for i, port in enumerate(ports):
            self.start(
                f"web-{i + 1}",
                [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "dr_portal.asgi:application"],
            )
        for port in ports:
            wait_for(
                lambda port=port: http_ok(f"http://127.0.0.1:{port}/accounts/login/"), 60, f"Daphne on port {port}"
            )
        sessions = self.start_failbacks(users[0])
        # Client n watches session n mod S through web process (n div S) mod W; operators and viewers take turns per round.
        clients = [
            Client(
                n,
                sessions[n % len(sessions)],
                ports[n // len(sessions) % len(ports)],
                cookie_for(users[n // (len(sessions) * len(ports)) % 2]),
            )
            for n in range(args.clients)
        ]
        print(
            f"{len(sessions)} failbacks queued, to copy at {LIMIT_MB_S} MB/s each; {args.web} web processes on ports {', '.join(map(str, ports))}; "
            f"connecting {len(clients)} clients, then starting {args.workers} worker clusters of {self.env['Q_WORKERS']}"
        )
        published, t0, t_end, cpu = asyncio.run(self.measure(sessions, clients))
        logs = {
            name: (self.var / f"{name}.log").read_text(errors="replace") for name in self.procs
        }  # before anything is stopped
        return self.report(sessions, clients, published, t0, t_end, cpu, logs)

    def reset_services(self):
        import psycopg
        import redis

        with psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {PG_DATABASE} WITH (FORCE)")
            conn.execute(f"CREATE DATABASE {PG_DATABASE}")
        self.database_created = True
        redis.Redis.from_url(REDIS_URL).flushdb()

    def build_lab(self, data_mib):
        """Replicas of one disk each, written by their guest: seed_lab spreads its data budget too
        unevenly (its smallest replica holds 1/20 of its largest) for every phase 1 to outlast the window."""
        from django.conf import settings
        from django.core.management import call_command

        from failback.hypervisors.lab import LabHypervisor

        lab = LabHypervisor(settings.LAB_ROOT)
        capacity = (data_mib + 64) * 2**20
        for host in ("esx-prod-01", "esx-dr-01"):
            lab.add_host(host)
        for datastore in ("prod-ds-01", "dr-ds-01"):
            lab.add_datastore(datastore, 2 * self.args.sessions * capacity)
        for network in ("prod-net", "dr-net"):
            lab.add_network(network)
        chunk = os.urandom(4 * 2**20)
        for i in range(self.args.sessions):
            vm = lab.create_vm(
                f"load-{i + 1:02d}_replica",
                host="esx-dr-01",
                datastore="dr-ds-01",
                disks=[capacity],
                networks=["dr-net"],
                power_on=True,
            )
            for offset in range(0, data_mib * 2**20, len(chunk)):
                lab.guest_write(vm, "scsi0:0", offset, chunk)
        call_command("seed_lab", "--no-user", stdout=open(os.devnull, "w"))  # imports the replicas

    def users(self):
        from django.contrib.auth.models import Group, User

        operator = User.objects.create_user("load-operator")
        operator.groups.add(Group.objects.get(name="Operator"))
        viewer = User.objects.create_user("load-viewer")
        viewer.groups.add(Group.objects.get(name="Viewer"))
        return operator, viewer

    def start(self, name, command):
        log = open(self.var / f"{name}.log", "wb")
        self.procs[name] = subprocess.Popen(
            command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def start_failbacks(self, operator):
        """Queued in the broker: the workers start only once every client is connected."""
        from failback import workflow
        from failback.models import Replica

        return [
            workflow.start_failback(
                operator,
                replica.pk,
                vm_name=replica.source_name,
                target_host="esx-prod-01",
                target_datastore="prod-ds-01",
                network_map={"dr-net": "prod-net"},
                power_on_after=False,
                bandwidth_mbps=LIMIT_MB_S,
            ).pk
            for replica in Replica.objects.order_by("name")
        ]

    def start_workers(self, sessions):
        from failback.models import FailbackSession

        for i in range(self.args.workers):
            self.start(f"worker-{i + 1}", [sys.executable, "manage.py", "qcluster"])

        def all_copying():
            dead = [name for name, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise SystemExit(f"{', '.join(dead)} exited; see its log in {self.var}")
            return FailbackSession.objects.filter(
                pk__in=sessions, status="phase1", disks__bytes_done__gt=0
            ).distinct().count() == len(sessions)

        wait_for(all_copying, 120, "every failback to be copying")

    # -- the measurement -----------------------------------------------------------------------
    async def measure(self, sessions, clients):
        from channels.layers import get_channel_layer

        from failback.broadcast import session_group

        layer = get_channel_layer()
        published = {s: {} for s in sessions}  # session -> {nudge: (sent, seen by the reference listener)}
        listeners = [asyncio.create_task(listen(layer, session_group(s), published[s])) for s in sessions]
        connecting = asyncio.Semaphore(20)
        tasks = [asyncio.create_task(c.run(connecting)) for c in clients]
        try:
            deadline = time.monotonic() + 120
            while not all(c.ready.is_set() or c.error for c in clients):
                if time.monotonic() > deadline:
                    raise SystemExit(f"{sum(not c.ready.is_set() for c in clients)} clients did not connect in 120 s")
                await asyncio.sleep(0.1)
            failed = [c for c in clients if c.error]
            if failed:
                raise SystemExit(f"{len(failed)} clients could not connect, e.g.: {failed[0].error}")
            await asyncio.to_thread(self.start_workers, sessions)
            cpu0, t0 = cpu_sample(self.procs), time.time()
            await asyncio.sleep(self.args.seconds)
            cpu1, t_end = cpu_sample(self.procs), time.time()
            drain_end = time.monotonic() + DRAIN_S
            while time.monotonic() < drain_end and any(
                c.missing(published[c.session], t0, t_end - GRACE_S) for c in clients
            ):
                await asyncio.sleep(0.5)
            await asyncio.gather(*(c.close() for c in clients))
        finally:
            for task in tasks + listeners:
                task.cancel()
            await asyncio.wait(tasks + listeners, timeout=10)
        return published, t0, t_end, cpu_usage(cpu0, cpu1, t_end - t0)

    # -- results -------------------------------------------------------------------------------
    def report(self, sessions, clients, published, t0, t_end, cpu, logs):
        from failback.models import FailbackSession

        window_end = t_end - GRACE_S
        expected = received = late = 0
        latencies = []
        for c in clients:
            due = c.due(published[c.session], t0, window_end)
            got = due & c.got.keys()
            expected += len(due)
            received += len(got)
            late += sum(c.got[n][1] > t_end for n in got)
            latencies += [(c.got[n][1] - c.got[n][0]) * 1000 for n in got]
        layer_ms = sorted(
            (seen - sent) * 1000 for s in sessions for sent, seen in published[s].values() if t0 <= sent <= window_end
        )
        nudges = len(layer_ms)
        stray = sum(len(c.got.keys() - published[c.session].keys()) for c in clients)
        dropped = sum(bool(c.error) for c in clients)
        copying = FailbackSession.objects.filter(pk__in=sessions, status="phase1").count()
        tracebacks = sum(text.count("Traceback (most recent call last)") for text in logs.values())
        db_errors = sum(len(DB_ERRORS.findall(text)) for text in logs.values())
        latencies.sort()
        p95 = latencies[int(0.95 * (len(latencies) - 1))] if latencies else float("nan")
        print(
            f"window {t_end - t0:.1f} s ({GRACE_S:.0f} s grace): {nudges} nudges published for {len(sessions)} sessions "
            f"({nudges / (window_end - t0):.1f}/s); {received} of {expected} updates due reached the clients ({late} after the window); "
            f"{stray} received that the reference listeners did not see; {dropped} clients lost their connection"
        )
        if latencies:
            print(
                f"publish-to-receive ms: median {statistics.median(latencies):.0f}, p95 {p95:.0f}, "
                f"p99 {latencies[int(0.99 * (len(latencies) - 1))]:.0f}, max {latencies[-1]:.0f}; "
                f"publish to the reference listener (channel layer alone): median {statistics.median(layer_ms):.0f}, "
                f"p95 {layer_ms[int(0.95 * (len(layer_ms) - 1))]:.0f}"
            )
        print(
            f"sessions still in phase 1 at the end: {copying}/{len(sessions)}; logs of {len(logs)} processes: "
            f"{tracebacks} tracebacks, {db_errors} database errors"
        )
        for name, text in logs.items():
            for line in text.splitlines():
                if DB_ERRORS.search(line) or "Traceback" in line:
                    print(f"  {name}: {line[:200]}")
                    break
        print("cpu over the window, % of one core: " + ", ".join(f"{k} {v:.0f}" for k, v in cpu.items()))
        return f"clients={len(clients)} delivered={received / expected if expected else 0:.4f} p95_ms={p95:.0f}"

    def clean_up(self):
        for p in self.procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(p.pid, signal.SIGKILL)  # the cluster's workers, too, whatever they were doing
            except ProcessLookupError:
                pass
            p.wait()
        if self.database_created:
            from django.db import connections

            connections.close_all()
            import psycopg
            import redis

            with psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {PG_DATABASE} WITH (FORCE)")
            redis.Redis.from_url(REDIS_URL).flushdb()
        shutil.rmtree(self.var, ignore_errors=True)


class Client:
    """One browser tab on a session's page: its own login, one websocket."""

    def __init__(self, n, session, port, cookie):
        self.n, self.session, self.port, self.cookie = n, session, port, cookie
        self.ready = asyncio.Event()
        self.opened = None
        self.got = {}  # nudge -> (sent, received)
        self.error = None
        self.ws = None
        self.closing = False

    async def run(self, connecting):
        from websockets.asyncio.client import connect

        try:
            async with connecting:
                self.ws = await connect(
                    f"ws://127.0.0.1:{self.port}/ws/sessions/{self.session}/",
                    origin=f"http://127.0.0.1:{self.port}",
                    additional_headers={"Cookie": self.cookie},
                    compression=None,
                    max_size=None,
                    open_timeout=60,
                )
                await self.ws.recv()  # the page's state, rendered once the consumer watches the session
                self.opened = time.time()
            self.ready.set()
            async for text in self.ws:
                now = time.time()
                for nudge, sent in STAMP.findall(text, text.rfind("</section>")):  # one per nudge the update answers
                    self.got[nudge] = (float(sent), now)
        except Exception as exc:  # noqa: BLE001 - any failure is a result to report
            self.error = f"client {self.n}: {type(exc).__name__}: {exc}"
        else:
            if not self.closing:
                self.error = f"client {self.n}: closed by the server (code {self.ws.close_code})"

    def due(self, published, start, end):
        return {n for n, (sent, _) in published.items() if max(start, self.opened) <= sent <= end}

    def missing(self, published, start, end):
        return bool(self.due(published, start, end) - self.got.keys())

    async def close(self):
        self.closing = True
        if self.ws is not None:
            await self.ws.close()


async def listen(layer, group, seen):
    """The reference: every nudge published to the group, straight from the channel layer."""
    channel = await layer.new_channel()
    await layer.group_add(group, channel)  # left to the clean-up, which empties the layer
    while True:
        message = await layer.receive(channel)
        seen[message["nudge"]] = (message["sent"], time.time())


def cookie_for(user):
    from django.test import Client as HttpClient

    http = HttpClient()
    http.force_login(user)
    return f"sessionid={http.cookies['sessionid'].value}"


def cpu_sample(procs):
    """CPU ticks per role: our process groups, this process, PostgreSQL, Redis, and the machine."""
    roles = {p.pid: name.split("-")[0] for name, p in procs.items()}
    ticks = {"web": 0, "worker": 0, "bench": 0, "postgres": 0, "redis": 0}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        comm, fields = raw[raw.index("(") + 1 : raw.rindex(")")], raw[raw.rindex(")") + 2 :].split()
        used = int(fields[11]) + int(fields[12])
        session = int(fields[3])
        if session in roles:
            ticks[roles[session]] += used
        elif int(entry.name) == os.getpid():
            ticks["bench"] += used
        elif comm == "postgres" or comm.startswith("redis-server"):
            ticks[comm.split("-")[0]] += used
    cpu = Path("/proc/stat").read_text().split("\n")[0].split()[1:]
    ticks["machine"] = sum(map(int, cpu)) - int(cpu[3]) - int(cpu[4])  # all but idle and iowait
    return ticks


def cpu_usage(before, after, seconds):
    hz = os.sysconf("SC_CLK_TCK")
    usage = {k: 100 * (after[k] - before[k]) / hz / seconds for k in before}
    usage["others"] = usage["machine"] - sum(
        v for k, v in usage.items() if k != "machine"
    )  # whatever else shares the machine
    return usage


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_ok(url):
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


if __name__ == "__main__":
    main()
