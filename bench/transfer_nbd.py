"""NBD transport benchmark (issue 18): the engine over NBD against the engine on local files (direct),
the same shapes, the same run, alternated.

Run: .venv/bin/python bench/transfer_nbd.py [--quick] [--shapes sparse,dense,random,sweep] [--unix]
     (BENCH_DIR=... to choose where the images go; they are deleted at the end)

Both sides of an nbd pass are Debian's nbdkit (``file`` plugin) serving the image files, over TCP with
TLS on loopback (certificates made here with openssl), or over Unix sockets with --unix; the engine
reaches them through libnbd. Shapes and changes are bench/transfer.py's (--quick divides sizes by 16):
- phase 1 of sparse, dense and random: full_copy direct vs over NBD (durable=False both, after
  os.sync(), source in the page cache); nbd_phase1_vs_direct = direct median / nbd median (1.0: as
  fast; above 0.7 is the issue's bar), worst shape. Each side's CPU seconds are printed too (direct:
  this process; nbd: this process and both nbdkit, and each apart), with the cores they kept busy
  (CPU seconds / wall seconds: 2.0 is both cores of this machine), and, when libnbd's own copier nbdcopy is
  installed (Debian's libnbd-bin), the same copy by nbdcopy between the same two exports in the same
  rounds: the C reference for what NBD costs here (it does not hash; nbdcopy_vs_direct, worst shape;
  --nbdcopy-flags to try its connections, requests and request size);
- the NBD copy must equal the source (disk digest) and keep its holes (no data where the source has a
  hole, no more allocated): nbd_holes_kept;
- sweep: 1 and 16 GiB at 10 % allocated, the same 64 x 64 KiB change on each, the switch's data window
  (tracked final delta + verify_changes, durable) over NBD: nbd_window_growth = 16 GiB / 1 GiB; and
  nbd_window_vs_direct = nbd window / direct window on 16 GiB for the same change (the issue's bound: 2).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import transfer as base  # noqa: E402  bench/transfer.py: shapes, images, changes

from failback.transfer import delta_copy, disk_digest, full_copy, verify_changes  # noqa: E402
from tests.nbd_support import make_certificates, require_nbd, served  # noqa: E402

GiB, MiB, KiB = base.GiB, base.MiB, base.KiB


def empty(path: str, size: int) -> None:
    """An empty sparse file of size bytes, same inode when it exists (a served file stays served)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, 0)
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


class Ends:
    """Serves a source and a target file with nbdkit for the duration of a block."""

    def __init__(self, work: str, certs: str | None) -> None:
        self.work, self.certs = work, certs
        self.pids: list[int] = []  # this process, then the source's and the target's nbdkit

    @contextlib.contextmanager
    def __call__(self, src: str, dst: str):
        with (
            served(src, readonly=True, certs=self.certs, workdir=self.work) as s,
            served(dst, readonly=False, certs=self.certs, workdir=self.work) as d,
        ):
            self.pids = [os.getpid(), s.proc.pid, d.proc.pid]
            yield s.uri, d.uri


def cpu_split(pids: list[int]) -> list[float]:
    """User and system CPU seconds each process (all its threads, ended ones too) has used so far,
    then those of this process's ended children (nbdcopy)."""
    ended = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = []
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        out.append((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    return [*out, ended.ru_utime + ended.ru_stime]


def cpu_seconds(pids: list[int]) -> float:
    return sum(cpu_split(pids))


def timed_cpu(
    fn, pids: list[int], times: list[float], cpus: list[float], parts: list[list[float]] | None = None, cached=()
) -> None:
    """Time fn: wall seconds to times, CPU seconds of pids (and ended children) to cpus, and when
    parts is given, each process's CPU seconds (pids' order, then the children) to it. The cached
    files' data is read into the page cache first (bench/transfer.py's warm())."""
    os.sync()
    base.warm(*cached)
    c, t = cpu_split(pids), time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
    used = [b - a for a, b in zip(c, cpu_split(pids), strict=True)]
    cpus.append(sum(used))
    if parts is not None:
        parts.append(used)


def phase1(work: str, shape: base.Shape, rng: random.Random, rounds: int, ends: Ends, nbdcopy_flags: list[str]) -> None:
    src, dst, nbd_dst, state = (os.path.join(work, n) for n in ("src.img", "dst.img", "nbd-dst.img", "state"))
    print(f"{shape.name}: {shape.size / GiB:.2f} GiB, {shape.allocated:.0%} allocated")
    base.build(src, shape.size, shape.allocated, rng)
    empty(nbd_dst, shape.size)
    direct: list[float] = []
    nbd: list[float] = []
    ref: list[float] = []  # nbdcopy
    cpu: dict[str, list[float]] = {"direct": [], "nbd": [], "ref": []}
    parts: list[list[float]] = []  # over NBD: the engine's, the source nbdkit's, the target nbdkit's CPU
    nbdcopy = shutil.which("nbdcopy")
    with ends(src, nbd_dst) as (s_uri, d_uri):

        def over_nbd(times: list[float] = nbd, cpus: list[float] = cpu["nbd"], split: list | None = parts) -> None:
            base.remove(state)
            empty(nbd_dst, shape.size)
            timed_cpu(
                lambda: full_copy(s_uri, d_uri, state_dir=state, durable=False), ends.pids, times, cpus, split, (src,)
            )

        def on_files() -> None:
            base.remove(dst, state)
            timed_cpu(
                lambda: full_copy(src, dst, state_dir=state, durable=False),
                ends.pids[:1],
                direct,
                cpu["direct"],
                cached=(src,),
            )

        def by_nbdcopy() -> None:
            empty(nbd_dst, shape.size)
            timed_cpu(
                lambda: base.run([nbdcopy, *nbdcopy_flags, s_uri, d_uri]), ends.pids[1:], ref, cpu["ref"], cached=(src,)
            )

        steps = [over_nbd, on_files] + ([by_nbdcopy] if nbdcopy else [])
        for r in range(rounds + 1):  # round 0 warms up and is dropped
            for fn in steps if r % 2 == 0 else steps[::-1]:
                fn()
            if r == 0:
                for xs in (direct, nbd, ref, parts, *cpu.values()):
                    xs.clear()
        over_nbd([], [], None)  # the copy whose result is checked (not timed)
    same = disk_digest(src) == disk_digest(nbd_dst)
    holes = base.in_holes(nbd_dst, src) == 0 and base.allocated(nbd_dst) <= base.allocated(src)
    print(
        base.describe("phase 1 direct (full_copy on files)", direct) + f"  cpu {statistics.median(cpu['direct']):.2f} s"
    )
    print(base.describe("phase 1 nbd (full_copy over NBD)", nbd) + f"  cpu {statistics.median(cpu['nbd']):.2f} s")
    engine, source, target = (statistics.median(x[k] for x in parts) for k in range(3))
    print(
        f"    cpu over NBD: engine {engine:.2f} s, source nbdkit {source:.2f} s, target nbdkit {target:.2f} s; "
        f"cores busy {statistics.median(c / t for c, t in zip(cpu['nbd'], nbd, strict=True)):.2f} "
        f"(direct {statistics.median(c / t for c, t in zip(cpu['direct'], direct, strict=True)):.2f})"
    )
    if ref:
        flags = f" {' '.join(nbdcopy_flags)}" if nbdcopy_flags else ""
        print(base.describe(f"same copy by nbdcopy{flags}", ref) + f"  cpu {statistics.median(cpu['ref']):.2f} s")
        shape.results["nbdcopy_vs_direct"] = statistics.median(direct) / statistics.median(ref)
    print(
        f"  nbd copy identical={'yes' if same else 'no'} holes_kept={'yes' if holes else 'no'} "
        f"allocated {base.allocated(nbd_dst) / MiB:.1f} MiB (source {base.allocated(src) / MiB:.1f} MiB)"
    )
    shape.results["vs_direct"] = statistics.median(direct) / statistics.median(nbd)
    shape.results["holes_kept"] = 1.0 if same and holes else 0.0
    base.remove(src, dst, nbd_dst, state)


def window(work: str, size: int, rng: random.Random, rounds: int, ends: Ends | None) -> float:
    """Median seconds of the switch's data window (tracked final delta + verify_changes, durable) over
    NBD (ends given) or on the files, for the same changes as bench/transfer.py's sweep."""
    src, dst, state = (os.path.join(work, n) for n in ("w-src.img", "w-dst.img", "w-state"))
    base.build(src, size, 0.10, rng)
    empty(dst, size)
    xs = []
    with ends(src, dst) if ends else contextlib.nullcontext((src, dst)) as (s, d):
        full_copy(s, d, state_dir=state)
        for k in range(rounds):
            extents = base.change(
                src, base.Shape("w", size, 0, 64, (64 * KiB, 64 * KiB)), random.Random(7 + k), discards=False
            )
            os.sync()
            base.warm(src, dst)
            t = time.perf_counter()
            delta_copy(s, d, state_dir=state, changed_extents=extents, source_quiet=True)
            proof = verify_changes(s, d, state_dir=state)
            xs.append(time.perf_counter() - t)
            assert proof.identical
            base.change(
                src, base.Shape("w", size, 0, 64, (64 * KiB, 64 * KiB)), random.Random(rng.random()), discards=False
            )
            delta_copy(s, d, state_dir=state, changed_extents=None)
    base.remove(src, dst, state)
    print(base.describe(f"switch data window {'nbd' if ends else 'direct'}, {size / GiB:.2f} GiB", xs))
    return statistics.median(xs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="sizes and changes divided by 16")
    parser.add_argument("--shapes", default="sparse,dense,random,sweep")
    parser.add_argument("--rounds", type=int, default=int(os.environ.get("BENCH_ROUNDS", "3")))
    parser.add_argument("--unix", action="store_true", help="Unix sockets instead of TLS on loopback")
    parser.add_argument(
        "--nbdcopy-flags",
        default="",
        help="flags for the nbdcopy reference, e.g. '--connections=2 --requests=4 --request-size=262144'",
    )
    args = parser.parse_args()
    require_nbd()
    wanted = set(args.shapes.split(","))
    work = tempfile.mkdtemp(prefix="failback-bench-nbd-", dir=os.environ.get("BENCH_DIR") or tempfile.gettempdir())
    ends = Ends(work, None if args.unix else make_certificates(os.path.join(work, "tls")))
    rng = random.Random(20261203)
    load = os.getloadavg()
    done: list[base.Shape] = []
    growth = vs_direct_window = float("nan")
    try:
        for shape in base.shapes(args.quick):
            if shape.name in wanted:
                phase1(work, shape, rng, args.rounds, ends, args.nbdcopy_flags.split())
                done.append(shape)
        if "sweep" in wanted:
            d = 16 if args.quick else 1
            small, big = GiB // d, 16 * GiB // d
            w_small = window(work, small, random.Random(11), args.rounds, ends)
            w_big = window(work, big, random.Random(12), args.rounds, ends)
            w_direct = window(work, big, random.Random(12), args.rounds, None)
            growth, vs_direct_window = w_big / w_small, w_big / w_direct
    finally:
        shutil.rmtree(work, ignore_errors=True)
    worst = min((s.results["vs_direct"] for s in done), default=float("nan"))
    ref = min((s.results.get("nbdcopy_vs_direct", float("nan")) for s in done), default=float("nan"))
    holes = "n/a" if not done else "yes" if all(s.results["holes_kept"] == 1.0 for s in done) else "no"
    print(
        f"load average (1 min) at the start {load[0]:.2f}, at the end {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
    )
    print(
        f"nbd_phase1_vs_direct={worst:.2f} nbd_window_growth={growth:.2f} nbd_holes_kept={holes} "
        f"nbd_window_vs_direct={vs_direct_window:.2f} nbdcopy_vs_direct={ref:.2f} "
        f"({'Unix sockets' if args.unix else 'TLS on loopback'}" + (", quick shapes)" if args.quick else ")")
    )


if __name__ == "__main__":
    main()
