"""The production profile as a small cluster, from the files in deploy/: nginx terminating TLS on loopback in
front of two Daphne web nodes, three django-q2 worker nodes, PostgreSQL and Redis (tests/cluster_support.py).

A failback is driven through the proxy (the API with a token; websockets after a login through the form) while
nodes are lost: a worker node's whole process group killed with SIGKILL during phase 1 and again during the
switch, and a web node killed under connected websockets. The other nodes finish the session after the stall
limit, the clients reconnect through the proxy, the disks end byte-identical and no step is done twice.

The cluster needs PostgreSQL and Redis: on the production profile it takes a database of its own beside
DATABASE_URL's and the run's Redis database (REDIS_URL, with the xdist worker's offset); run on the embedded
profile it uses the production services at their default addresses, started by tests/services.sh. `make test`
runs these tests once, in the production profile.
"""

import filecmp
import os
import random
import shutil
import signal
import subprocess
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from django.conf import settings as django_settings

from failback.hypervisors.base import POWERED_OFF, POWERED_ON
from failback.hypervisors.lab import LabHypervisor

from .cluster_support import (
    DEFAULT_DATABASE_URL,
    DEFAULT_REDIS_URL,
    DEPLOY,
    ROOT,
    Cluster,
    Watcher,
    drop_database,
    own_database_url,
    read_env_file,
    wait_for,
)

pytestmark = [pytest.mark.cluster, pytest.mark.process, pytest.mark.faults]

MiB = 1 << 20
STALL = 3  # FAILBACK_STALL_SECONDS of the cluster's nodes: a node silent this long has its step taken over


def cluster_urls():
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if os.environ.get("DATABASE_URL"):
        return own_database_url(os.environ["DATABASE_URL"], f"cluster{worker}"), django_settings.REDIS_URL
    subprocess.run(["sh", str(ROOT / "tests" / "services.sh")], check=True, capture_output=True)
    url = urlsplit(DEFAULT_REDIS_URL)
    offset = int(worker[2:]) if worker else 0
    redis_url = urlunsplit(url._replace(path=f"/{int(url.path.strip('/')) + offset}"))
    return own_database_url(DEFAULT_DATABASE_URL, f"cluster{worker}"), redis_url


@pytest.fixture
def cluster(tmp_path):
    subprocess.run(["sh", str(ROOT / "tests" / "apt.sh"), "nginx", "openssl"], check=True)
    database_url, redis_url = cluster_urls()
    cluster = Cluster(
        tmp_path,
        database_url,
        redis_url,
        settings={
            "FAILBACK_STALL_SECONDS": str(STALL),
            "FAILBACK_HEARTBEAT_SECONDS": "0.5",
            "FAILBACK_PROGRESS_INTERVAL": "0.2",
            "FAILBACK_SHUTDOWN_TIMEOUT": "30",
        },
    )
    cluster.prepare()
    try:
        cluster.start()
        cluster.start_watchdog()
        yield cluster
    finally:
        cluster.stop()
        print(cluster.logs())
        drop_database(database_url)


def make_replica(cluster, name, *, size=64 * MiB, data=48 * MiB, **options):
    """A running lab replica holding ``data`` bytes of random data, imported by the cluster's seed_lab."""
    lab = LabHypervisor(cluster.lab_root)
    vm_id = lab.create_vm(
        f"{name}_replica",
        host="esx-dr-01",
        datastore="dr-ds-01",
        disks=[size],
        networks=["dr-net"],
        power_on=True,
        **options,
    )
    rng = random.Random(name)
    with open(lab.disk_path(vm_id, "scsi0:0"), "r+b") as disk:
        for offset in range(0, data, 16 * MiB):
            disk.write(rng.randbytes(min(16 * MiB, data - offset)))
    cluster.manage("seed_lab", "--no-user")
    replica = cluster.api("GET", f"/replicas?q={name}_replica")["items"][0]
    return lab, replica


def test_it_checks_the_deploy_files_with_nginx_and_systemd(tmp_path):
    subprocess.run(["sh", str(ROOT / "tests" / "apt.sh"), "nginx", "openssl"], check=True)
    cluster = Cluster(tmp_path, *cluster_urls())  # the files only: nothing is started
    cluster.write_configs()
    code, output = cluster.nginx_test()
    assert code == 0 and "syntax is ok" in output and "test is successful" in output, output
    units = cluster.workdir / "units"
    units.mkdir(exist_ok=True)
    etc = cluster.workdir / "etc"
    shutil.copy(etc / "dr-portal-web@.service", units / f"dr-portal-web@{cluster.web_ports[0]}.service")
    shutil.copy(etc / "dr-portal-worker.service", units / "dr-portal-worker.service")
    verify = subprocess.run(
        ["systemd-analyze", "verify", *sorted(str(p) for p in units.iterdir())], capture_output=True, text=True
    )
    # verify only warns (exit 0) on an unknown or mistyped directive: any output at all is a finding.
    assert verify.returncode == 0 and not (verify.stdout + verify.stderr).strip(), verify.stdout + verify.stderr
    for unit in ("dr-portal-web@.service", "dr-portal-worker.service"):
        text = (DEPLOY / "systemd" / unit).read_text()
        for line in ("Restart=on-failure", "NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes"):
            assert f"\n{line}\n" in text, f"{unit} lacks {line}"
        assert "\nEnvironmentFile=/etc/dr-portal/dr-portal.env\n" in text
        assert "\nReadWritePaths=/var/lib/dr-portal" in text
    from dr_portal.env import READ  # the names the settings read (filled when they loaded)

    assert set(read_env_file(DEPLOY / "dr-portal.env")) <= set(READ), "the env file sets a name nothing reads"


def test_it_finishes_a_failback_through_the_proxy_when_a_worker_node_dies_in_each_phase_and_a_web_node_under_its_clients(
    cluster,
):
    lab, replica = make_replica(cluster, "erp-cl", tools_installed=True, shutdown_seconds=3)
    cookie = cluster.login()  # the form through the proxy: CSRF, secure cookie, forwarded https
    session = cluster.start_failback(replica["id"], bandwidth_mbps=8)  # 48 MiB at 8 MB/s: about 6 s
    watchers = [Watcher(cluster, f"/ws/sessions/{session['id']}/", cookie) for _ in range(4)]
    for watcher in watchers:  # one after the other: nginx hands them to the two web nodes in turn
        watcher.start()
        wait_for(lambda w=watcher: w.connections, timeout=20, what="a websocket through the proxy")
    # Live progress through the proxy: the same disk seen at two different percentages while it copies.
    wait_for(
        lambda: any(len({p for *_, s, p in w.frames if s == "Phase 1 running" and p}) >= 2 for w in watchers),
        timeout=60,
        interval=0.1,
        what="live phase 1 progress over the websockets",
    )

    wait_for(  # past the first checkpoint (every 2 s), so the resumed copy has one to go on from
        lambda: cluster.session(session["id"])["disks"][0]["bytes_done"] > 20 * MiB,
        timeout=60,
        what="phase 1 under way",
    )

    # -- a worker node lost mid-phase-1, a web node lost under its clients, at the same moment ---------------
    first = wait_for(lambda: cluster.worker_holding(session["id"]), timeout=20, what="the node running phase 1")
    web = cluster.web[0]
    first.kill(signal.SIGKILL)
    web.kill(signal.SIGKILL)
    done_at_kill = cluster.session(session["id"])["disks"][0]["bytes_done"]
    assert 0 < done_at_kill < 48 * MiB, "phase 1 ended before the kill: nothing was tested"
    lab.guest_write(replica["vm_id"], "scsi0:0", 2 * MiB, b"written while a node was down" * 4096)
    s = cluster.wait_status(session["id"], "ready_to_switch", "failed", timeout=90)
    assert s["status"] == "ready_to_switch", s["error"]

    # -- a worker node lost mid-switch, while the guest shuts down ------------------------------------
    lab.guest_write(replica["vm_id"], "scsi0:0", 40 * MiB, b"last change before the switch" * 4096)
    cluster.api("POST", f"/sessions/{session['id']}/switch", {"reason": "cluster test"})
    wait_for(
        lambda: lab.vm_meta(replica["vm_id"])["shutdown_requested_at"], timeout=60, interval=0.05, what="guest shutdown"
    )
    second = wait_for(lambda: cluster.worker_holding(session["id"]), timeout=20, what="the node running the switch")
    assert second is not first
    second.kill(signal.SIGKILL)
    assert cluster.session(session["id"])["status"] == "switching"
    s = cluster.wait_status(session["id"], "failback", "failed", timeout=90)
    assert s["status"] == "failback", s["error"]
    for node in (first, second, web):  # systemd's Restart= brings them back; the session does not need them
        cluster.restart(node)
    cluster.api("POST", f"/sessions/{session['id']}/commit", {"reason": "app team confirmed"})
    s = cluster.wait_status(session["id"], "committed", "failed", timeout=90)
    assert s["status"] == "committed", s["error"]

    # -- the disks, the record ------------------------------------------------------------------------
    assert lab.power_state(s["production_vm_id"]) == POWERED_ON and lab.power_state(replica["vm_id"]) == POWERED_OFF
    for disk in s["disks"]:
        assert disk["verified"]
        assert filecmp.cmp(
            lab.disk_path(replica["vm_id"], disk["key"]),
            lab.disk_path(s["production_vm_id"], disk["key"]),
            shallow=False,
        )
    rows = cluster.audit(session["id"])
    actions = Counter(row["action"] for row in rows)
    disks = len(s["disks"])
    once = ["start_failback", "create_production_vm", "finish_phase1", "switch", "stop_replica", "finish_switch"]
    assert {a: actions[a] for a in once} == dict.fromkeys(once, 1), actions
    assert actions["copy_disk"] == disks and actions["send_changes"] == disks, actions
    assert actions["commit"] == 1 and actions["finish_commit"] == 1, actions
    resumed = sorted(row["data"]["step"] for row in rows if row["action"] == "resume")
    assert resumed == ["phase1", "phase2"], resumed
    copy = next(row for row in rows if row["action"] == "copy_disk")
    assert 0 < copy["data"]["resumed_from"] <= done_at_kill  # phase 1 went on from its checkpoint

    # -- the clients --------------------------------------------------------------------------------
    wait_for(
        lambda: all(w.status() == "Committed" for w in watchers), timeout=30, what="every client to see the commit"
    )
    for w in watchers:
        w.stop()
    reconnected = [w for w in watchers if w.connections >= 2]
    assert reconnected, "no client was on the killed web node"
    for w in reconnected:  # after reconnecting through the proxy (to the other node) the updates still came
        assert "Committed" in {status for _, conn, status, _ in w.frames if conn >= 2}, w.frames[-3:]
    statuses = {status for w in watchers for *_, status, _ in w.frames}
    assert {"Phase 1 running", "Ready to switch", "Committed"} <= statuses, statuses
    assert not Path(cluster.workdir / "logs" / "proxy.log").read_text().count("[emerg]")
