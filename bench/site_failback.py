"""A site-wide failback, measured: one plan of many lab VMs and standalone sessions at once, start to commit.

The portal runs as in deploy/ (tests/cluster_support.py): nginx with TLS in front of two Daphne web nodes and
three django-q2 worker nodes. On the production profile (PostgreSQL + Redis, the default here) that is the
whole point; on the embedded profile (--profile embedded: SQLite and its channel layer, every node on the
same files) the same cluster shows where SQLite stops. Everything is driven through the proxy: the API with a
token starts the plan (its members in boot order, phase 1 ``--concurrency`` at a time, one switch for all)
and the standalone sessions (automatic switch), then commits them all once switched, while ``--watchers``
websocket clients (logged in through the form) watch the sessions' pages.

Printed: completion time, sessions failed, database errors in the nodes' logs (and 5xx answers), the audit
rows written against the rows expected (each session: its production VM created, phase 1 finished, the
replica stopped, the switch and the commit finished once each, and one copy and one final delta per disk),
websocket delivery (the watchers that saw their session committed), the worker nodes' peak RSS, and the
portal's own time per VM: each session's phase 1 and its switch from the replica being off, less the time its
disks' copies and final deltas took (the median over sessions). The last line:

    vms=<n> failed=<n> db_errors=<n> audit_complete=<yes|no> delivered=<fraction> wall_s=<s> per_vm_overhead_s=<s>

    .venv/bin/python bench/site_failback.py                       # production: 100 plan VMs + 20 standalone
    .venv/bin/python bench/site_failback.py --profile embedded --vms 30 --standalone 6

DATABASE_URL and REDIS_URL name the servers (a database of their own, ``<name>_bench``, is created and
dropped; the Redis database is flushed): defaults postgres://postgres@127.0.0.1:5432/dr_portal and
redis://127.0.0.1:6379/5.
"""

import argparse
import os
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "dr_portal.settings")

from tests.cluster_support import (  # noqa: E402
    DEFAULT_DATABASE_URL,
    DEFAULT_REDIS_URL,
    Cluster,
    Watcher,
    drop_database,
    own_database_url,
    wait_for,
)

ONCE = ["create_production_vm", "finish_phase1", "stop_replica", "finish_switch", "finish_commit"]
PER_DISK = ["copy_disk", "send_changes"]
ENDED = ("committed", "failed", "cancelled", "undone")
DB_ERROR = re.compile(r"OperationalError|DatabaseError|IntegrityError|InterfaceError|database is locked|deadlock")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--profile", choices=["production", "embedded"], default="production")
    p.add_argument("--vms", type=int, default=100, help="lab VMs in the plan")
    p.add_argument("--standalone", type=int, default=20, help="standalone sessions started beside the plan")
    p.add_argument("--watchers", type=int, default=50, help="websocket clients watching sessions")
    p.add_argument("--concurrency", type=int, default=6, help="the plan's phase 1 concurrency")
    p.add_argument("--q-workers", type=int, default=2, help="Q_WORKERS of each of the three worker nodes")
    p.add_argument("--scale", type=float, default=0.004, help="seed_lab disk scale (small disks)")
    p.add_argument("--timeout", type=float, default=1800)
    return p.parse_args()


def make_cluster(args, workdir):
    if args.profile == "production":
        database_url = own_database_url(os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL, "bench")
        redis_url = os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL
    else:
        database_url, redis_url = f"sqlite:///{workdir}/shared/db.sqlite3", None
    return Cluster(
        workdir,
        database_url,
        redis_url,
        # The demo lab has guests that hang on shutdown: powered off after 15 s here (above the lab guests' 2-10 s shutdowns) rather than DOMAIN's 15 min.
        settings={
            "Q_WORKERS": str(args.q_workers),
            "FAILBACK_PROGRESS_INTERVAL": "0.5",
            "FAILBACK_SHUTDOWN_TIMEOUT": "15",
        },
    )


class RssSampler(threading.Thread):
    def __init__(self, cluster):
        super().__init__(daemon=True)
        self.cluster, self.peak, self.stopping = cluster, Counter(), threading.Event()

    def run(self):
        while not self.stopping.wait(0.5):
            for node in self.cluster.workers:
                self.peak[node.name] = max(self.peak[node.name], self.cluster.rss_bytes(node))


def start_everything(cluster, args):
    """The plan (boot order = replica order) and the standalone sessions, as fast as the API takes them."""
    replicas = sorted(cluster.api("GET", "/replicas?limit=500")["items"], key=lambda r: r["id"])
    assert len(replicas) >= args.vms + args.standalone, f"only {len(replicas)} replicas seeded"
    members = []
    with ThreadPoolExecutor(8) as pool:  # each replica's suggested network map (a platform inventory read each)
        maps = list(pool.map(lambda r: cluster.api("GET", f"/replicas/{r['id']}/targets"), replicas[: args.vms]))
    for i, (replica, targets) in enumerate(zip(replicas[: args.vms], maps, strict=True)):
        members.append(
            {
                "replica_id": replica["id"],
                "vm_name": f"{replica['source_name']}-prod",
                "target_host": ("esx-prod-01", "esx-prod-02")[i % 2],
                "target_datastore": ("prod-ds-01", "prod-ds-02")[i % 2],
                "network_map": targets["suggested_network_map"],
            }
        )
    started = time.monotonic()
    plan = cluster.api(
        "POST",
        "/plans",
        {"name": "site failback", "members": members, "concurrency": args.concurrency, "switch_mode": "manual"},
    )
    standalone = []
    for i, replica in enumerate(replicas[args.vms : args.vms + args.standalone]):
        standalone.append(
            cluster.start_failback(
                replica["id"],
                switch_mode="auto",
                target_host=("esx-prod-01", "esx-prod-02")[i % 2],
                target_datastore=("prod-ds-01", "prod-ds-02")[i % 2],
            )["id"]
        )
    return started, plan["id"], standalone


def sessions(cluster, ids):
    found = {}
    offset = 0
    while True:
        page = cluster.api("GET", f"/sessions?limit=500&offset={offset}")
        found.update({s["id"]: s for s in page["items"] if s["id"] in ids})
        offset += len(page["items"])
        if offset >= page["count"] or not page["items"]:
            return found


def drive(cluster, plan_id, standalone, timeout):
    """Switch the plan once all its members are ready, commit each thing once switched; until all end."""
    members = [m["session_id"] for m in cluster.api("GET", f"/plans/{plan_id}")["members"]]
    ids = set(members) | set(standalone)
    switched_plan, committed_plan, committed = False, False, set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = sessions(cluster, ids)
        states = Counter(s["status"] for s in now.values())
        if not switched_plan and all(now[m]["status"] in ("ready_to_switch", *ENDED) for m in members):
            cluster.api("POST", f"/plans/{plan_id}/switch", {"reason": "site failback"})
            switched_plan = True
        if not committed_plan and all(now[m]["status"] in ("failback", *ENDED) for m in members):
            cluster.api("POST", f"/plans/{plan_id}/commit", {"reason": "site verified"})
            committed_plan = True
        for sid in standalone:
            if sid not in committed and now[sid]["status"] == "failback":
                cluster.api("POST", f"/sessions/{sid}/commit", {"reason": "verified"})
                committed.add(sid)
        if all(s["status"] in ENDED for s in now.values()):
            return now
        print(f"  {dict(states)}", flush=True)
        time.sleep(2)
    raise SystemExit(f"not finished after {timeout} s: {dict(states)}")


def audit_figures(cluster, final):
    """(rows written of the expected kinds, rows expected, every session exactly as expected)."""
    written = expected = 0
    complete = True
    for sid, s in final.items():
        actions = Counter(row["action"] for row in cluster.audit(sid))
        disks = len(s["disks"])
        want = {**dict.fromkeys(ONCE, 1), **dict.fromkeys(PER_DISK, disks)}
        got = {a: actions[a] for a in want}
        written += sum(got.values())
        expected += sum(want.values())
        if got != want:
            complete = False
            print(f"  session {sid}: audit {got} expected {want}")
    return written, expected, complete


def overhead(cluster, final):
    """Median over sessions of phase 1 plus the switch once the replica is off, less the disk copies and final
    deltas themselves: the portal's own time per VM (database, lease, audit, platform calls, verification)."""
    per_session = []
    for sid, s in final.items():
        if s["status"] != "committed":
            continue
        rows = cluster.audit(sid)
        copy_s = sum(r["data"].get("seconds", 0) for r in rows if r["action"] == "copy_disk")
        delta_s = sum(
            (_t(r["data"]["ended_at"]) - _t(r["data"]["started_at"]))
            for r in rows
            if r["action"] == "send_changes" and r["data"].get("started_at")
        )
        # Phase 1, and the switch from the replica being off (the guest's own shutdown is not the portal's time).
        step_s = (_t(s["phase1_ended_at"]) - _t(s["phase1_started_at"])) + (
            _t(s["phase2_ended_at"]) - _t(s["replica_off_at"])
        )
        per_session.append(step_s - copy_s - delta_s)
    return statistics.median(per_session) if per_session else float("nan")


def _t(value):
    if isinstance(value, int | float):  # the disks' spans in the audit data are epoch seconds
        return float(value)
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


def count_db_errors(cluster):
    errors = 0
    for path in (cluster.workdir / "logs").glob("*.log"):
        errors += len(DB_ERROR.findall(path.read_text(errors="replace")))
    access = cluster.workdir / "logs" / "nginx-access.log"
    server_errors = len(re.findall(r'" 5\d\d ', access.read_text())) if access.exists() else 0
    return errors, server_errors


def main():
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped"))  # the nodes are stopped on the way out
    workdir = Path(tempfile.mkdtemp(prefix="site-failback-"))
    cluster = make_cluster(args, workdir)
    print(f"{args.profile}: {args.vms} plan VMs + {args.standalone} standalone, {args.watchers} watchers, in {workdir}")
    t0 = time.monotonic()
    cluster.prepare(seed_count=args.vms + args.standalone, seed_scale=args.scale)
    cluster.start()
    print(f"  cluster up in {time.monotonic() - t0:.1f} s")
    rss = RssSampler(cluster)
    rss.start()
    watchers = []
    try:
        cookie = cluster.login()
        started, plan_id, standalone = start_everything(cluster, args)
        members = [m["session_id"] for m in cluster.api("GET", f"/plans/{plan_id}")["members"]]
        everything = standalone + members  # the watchers spread over all sessions, standalone ones first
        for i in range(args.watchers):
            sid = everything[i % len(everything)]
            watchers.append(Watcher(cluster, f"/ws/sessions/{sid}/", cookie))
            watchers[-1].start()
        final = drive(cluster, plan_id, standalone, args.timeout)
        wall = time.monotonic() - started
        try:
            wait_for(lambda: all(w.status() in ("Committed", "Failed") for w in watchers), timeout=30)
        except AssertionError:
            pass
        delivered = sum(w.status() == "Committed" for w in watchers) / max(1, len(watchers))
        reconnects = sum(max(0, w.connections - 1) for w in watchers)
        failed = sum(s["status"] != "committed" for s in final.values())
        written, expected, complete = audit_figures(cluster, final)
        db_errors, server_errors = count_db_errors(cluster)
        per_vm = overhead(cluster, final)
    finally:
        for w in watchers:
            w.stop()
        rss.stopping.set()
        cluster.stop()
        if cluster.database_url.startswith("postgres"):
            drop_database(cluster.database_url)
    vms = len(final)
    print(f"  sessions {vms} ({args.vms} in the plan, {args.standalone} standalone), failed {failed}")
    print(
        f"  wall {wall:.1f} s from the first start to the last commit; portal's own time per VM (median) {per_vm:.2f} s"
    )
    print(f"  audit rows {written} written of {expected} expected; complete: {complete}")
    print(f"  database errors in the nodes' logs {db_errors}; 5xx answers through the proxy {server_errors}")
    print(f"  websocket watchers {len(watchers)}: {delivered:.2f} saw their session committed; reconnects {reconnects}")
    peaks = ", ".join(f"{name} {b / 2**20:.0f} MiB" for name, b in sorted(rss.peak.items()))
    print(f"  worker nodes' peak RSS (whole process group, Q_WORKERS={args.q_workers}): {peaks}")
    print(
        f"vms={vms} failed={failed} db_errors={db_errors} audit_complete={'yes' if complete else 'no'} "
        f"delivered={round(delivered, 3)} wall_s={wall:.1f} per_vm_overhead_s={per_vm:.2f}"
    )


if __name__ == "__main__":
    main()
