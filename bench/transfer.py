"""Transfer engine benchmark (issues 3 and 13): phase 1 against cp, deltas against rsync, the switch's
data window, write amplification, holes, peak memory, on several image shapes.

Run: .venv/bin/python bench/transfer.py [--quick] [--shapes sparse,dense,random,sweep] [--bandwidth] [--pair]
     [--phase1-only] (phase 1 against cp alone, a few minutes instead of ten)
     (BENCH_DIR=... to choose where the images go; they are deleted at the end)

Shapes (--quick divides every size and change count by 16):
- sparse: 8 GiB, 10 % allocated in 1-4 MiB extents; 40 MiB changed in small scattered 4-64 KiB writes
- dense:  4 GiB, all allocated; 1 % changed in 64 KiB writes
- random: 2 GiB, 50 % allocated; 10,000 random 4 KiB writes
- sweep:  1, 4 and 16 GiB at 10 % allocated, the same 64 x 64 KiB change on each: the switch's data
          window (tracked final delta + verify_changes) on 16 GiB over the one on 1 GiB is window_growth
Images hold, per 256 KiB of data, a run of zeroed (allocated) pages; the changes of sparse, dense and
random also discard (punch, as a guest's TRIM/UNMAP does) one range of 16-256 KiB of the source's data
per 16 writes, which the target must give back too.
Each shape prints phase 1 (full_copy, durable=False, as cp and rsync do not flush) against
`cp --sparse=always`, alternated, and the tracked and digest deltas against
`rsync --inplace --no-whole-file` of the changed image onto the old copy (the tracked delta as the
switch runs it, with the source quiet: see delta_copy's source_quiet); per delta method, the bytes
written against the 4 KiB pages whose content changed to data (write_amplification: pages that became
zeros are punched, not written), the target's allocation against the source's, and the target's data
lying in a hole of the source (holes_kept=yes: none, and no more allocated than the source), and
correctness.
Every timed run starts after os.sync(), with the files it reads in the page cache (see warm()); the
switch windows of the sweep with their data cached and their holes not, the sizes taking turns (see
windows()). Between delta runs the target is restored from a copy of phase 1's result, and its seal
re-recorded as phase 1 left it.
The last line holds the summary: worst case over the shapes for each figure.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import blake3

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from failback.transfer import delta_copy, disk_digest, full_copy, verify_changes  # noqa: E402
from failback.transfer.blockmap import fingerprint  # noqa: E402
from failback.transfer.sparse import data_extents, punch_hole  # noqa: E402

GiB, MiB, KiB = 1 << 30, 1 << 20, 1 << 10
PAGE = 4 * KiB


@dataclass
class Shape:
    name: str
    size: int
    allocated: float  # fraction
    writes: int
    write_size: tuple[int, int]  # min, max bytes (multiples of 4 KiB)
    results: dict[str, float] = field(default_factory=dict)


def shapes(quick: bool) -> list[Shape]:
    d = 16 if quick else 1
    return [
        Shape("sparse", 8 * GiB // d, 0.10, 1024 // d, (4 * KiB, 64 * KiB)),
        Shape("dense", 4 * GiB // d, 1.0, 655 // d, (64 * KiB, 64 * KiB)),
        Shape("random", 2 * GiB // d, 0.50, 10_000 // d, (4 * KiB, 4 * KiB)),
    ]


def content(rng: random.Random, n: int) -> bytes:
    """n bytes of data with, per 256 KiB, one run of 4-32 KiB of zeroed pages (written, so allocated: a
    guest's zeroed blocks); a discard there changes the allocation but not the content."""
    data = bytearray(blake3.blake3(rng.randbytes(16)).digest(length=n))
    for base in range(0, n - 32 * KiB, 256 * KiB):
        off = base + rng.randrange(0, (min(256 * KiB, n - base) - 32 * KiB) // PAGE + 1) * PAGE
        zeros = rng.randrange(1, 9) * PAGE
        data[off : off + zeros] = bytes(zeros)
    return bytes(data)


def build(path: str, size: int, fraction: float, rng: random.Random) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        if fraction >= 1.0:
            for off in range(0, size, 4 * MiB):
                os.pwrite(fd, content(rng, min(4 * MiB, size - off)), off)
            return
        target, done = int(size * fraction), 0
        while done < target:
            n = rng.randrange(1, 5) * MiB
            off = rng.randrange(0, (size - n) // MiB) * MiB
            os.pwrite(fd, content(rng, n), off)
            done += n
    finally:
        os.close(fd)


def change(path: str, shape: Shape, rng: random.Random, *, discards: bool = True) -> list[tuple[int, int]]:
    """Write the shape's changes into path, and discard (punch) one data range per 16 writes; the
    changed extents, as change tracking would report them."""
    extents = []
    fd = os.open(path, os.O_RDWR)
    try:
        for _ in range(shape.writes):
            n = rng.randrange(shape.write_size[0] // PAGE, shape.write_size[1] // PAGE + 1) * PAGE
            off = rng.randrange(0, (shape.size - n) // PAGE) * PAGE
            os.pwrite(fd, blake3.blake3(rng.randbytes(16)).digest(length=n), off)
            extents.append((off, n))
        data = [(a, b) for a, b in data_extents(fd, 0, shape.size) if b - a >= 2 * PAGE] if discards else []
        for _ in range(shape.writes // 16 if data else 0):
            a, b = rng.choice(data)
            n = min(rng.randrange(4, 65) * PAGE, (b - a) // PAGE * PAGE)
            off = a + rng.randrange(0, (b - a - n) // PAGE + 1) * PAGE
            punch_hole(fd, off, n)
            extents.append((off, n))
    finally:
        os.close(fd)
    return extents


def changed_bytes(a: str, b: str, extents: list[tuple[int, int]]) -> tuple[int, int]:
    """(bytes of the 4 KiB pages that differ between a and b, of those the pages that now hold data),
    looked for inside the changed extents. A page that became zeros (a discard, a write of zeros) is
    punched, not written, so write amplification is reckoned against the pages that became data."""
    total = data = 0
    pages = sorted({o for off, n in extents for o in range(off - off % PAGE, off + n, PAGE)})
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for o in pages:
            fa.seek(o)
            fb.seek(o)
            x, y = fa.read(PAGE), fb.read(PAGE)
            if x != y:
                total += len(y)
                data += len(y) if y.count(0) != len(y) else 0
    return total, data


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def clone(src: str, dst: str) -> None:
    """Copy src onto dst in place (same inode), allocated exactly where src is: its data ranges are
    copied as they are, zeros included (cp --sparse=auto would punch the zeros of a file it finds
    sparse, and hide a target that kept space it should have given back)."""
    sfd, dfd = os.open(src, os.O_RDONLY), os.open(dst, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        size = os.fstat(sfd).st_size
        os.ftruncate(dfd, 0)
        os.ftruncate(dfd, size)
        for a, b in data_extents(sfd, 0, size):
            while a < b:
                a += os.copy_file_range(sfd, dfd, b - a, a, a)
    finally:
        os.close(sfd)
        os.close(dfd)


def in_holes(dst: str, src: str) -> int:
    """Bytes dst allocates where src has a hole (a hole the target did not keep)."""
    with open(src, "rb") as fs, open(dst, "rb") as fd:
        size = os.fstat(fs.fileno()).st_size
        holes, at = [], 0
        for a, b in data_extents(fs.fileno(), 0, size):
            holes.append((at, a))
            at = b
        holes.append((at, size))
        return sum(
            max(0, min(b, y) - max(a, x)) for a, b in data_extents(fd.fileno(), 0, size) for x, y in holes if x < y
        )


def remove(*paths: str) -> None:
    for p in paths:
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.unlink(p)


def drop(*paths: str) -> None:
    """Drop the files' pages from the page cache (they are clean: os.sync() ran)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(*paths: str) -> None:
    """Read the files' data into the page cache. This machine's kernel pages out page cache left idle
    for 6 s (DAMON reclaim, `pageout` at age 12 x 500 ms, up to 128 MiB/s): without this an image read
    once per round was partly on disk for one run and not the next, and runs of both sides came out
    0.34 or 0.9 s at random."""
    buf = bytearray(8 << 20)
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            for a, b in data_extents(fd, 0, os.fstat(fd).st_size):
                while a < b:
                    a += os.preadv(fd, [memoryview(buf)[: min(len(buf), b - a)]], a) or b - a
        finally:
            os.close(fd)


def timed(fn: Callable[[], object], *cached: str) -> float:
    """Seconds fn takes, after os.sync() and with the cached files' data in the page cache."""
    os.sync()
    warm(*cached)
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True)


def describe(name: str, xs: list[float]) -> str:
    runs = " ".join(f"{x:.3f}" for x in xs)
    return f"  {name:<38} median {statistics.median(xs):7.3f} s  runs: {runs}"


def restore(base: str, dst: str, base_state: str, state: str) -> None:
    """Put phase 1's result back: base onto dst (same inode), base_state as the state, dst's seal
    re-recorded as phase 1 left it."""
    clone(base, dst)
    remove(state)
    shutil.copytree(base_state, state)
    reseal(dst, state)


def reseal(dst: str, state: str) -> None:
    """The target was restored by a copy: record its seal as phase 1 left it (bench only)."""
    path = os.path.join(state, "state.json")
    with open(path) as f:
        data = json.load(f)
    fd = os.open(dst, os.O_RDONLY)
    try:
        data["target_seal"] = fingerprint(fd)
    finally:
        os.close(fd)
    with open(path, "w") as f:
        json.dump(data, f)


def phase1(work: str, src: str, rounds: int) -> tuple[list[float], list[float]]:
    """Phase 1's copy against cp's, alternated. Each copy is removed as soon as it is timed, before
    anything syncs it. Before, the next run's os.sync() first wrote the other tool's copy out (760 MiB
    on the random shape), and on this VM a copy started right after such a write-out often ran 2-4x
    slower (cp by hand: 0.30-1.24 s right after, 0.31 s five seconds later). That hit whichever tool
    went second in a round, cp and ours alike (random shape: 0.26 s first, 0.77-0.85 s second), and
    with an odd number of rounds ours went second once more than cp."""
    dst, cpy, state = (os.path.join(work, n) for n in ("dst.img", "cp.img", "state"))
    ours: list[float] = []
    cp: list[float] = []

    def ours_full() -> None:
        remove(dst, state)
        ours.append(timed(lambda: full_copy(src, dst, state_dir=state, durable=False), src))
        remove(dst, state)

    def cp_full() -> None:
        remove(cpy)
        cp.append(timed(lambda: run(["cp", "--sparse=always", src, cpy]), src))
        remove(cpy)

    for r in range(rounds + 1):  # round 0 warms up (page cache, allocator) and is dropped
        for fn in (ours_full, cp_full) if r % 2 == 0 else (cp_full, ours_full):
            fn()
        if r == 0:
            ours.clear()
            cp.clear()
    remove(cpy)
    return ours, cp


def bench_shape(work: str, shape: Shape, rng: random.Random, rounds: int, phase1_only: bool = False) -> None:
    src, dst, state = (os.path.join(work, n) for n in ("src.img", "dst.img", "state"))
    base, base_state, old_src = (os.path.join(work, n) for n in ("base.img", "base-state", "old-src.img"))
    t = time.perf_counter()
    build(src, shape.size, shape.allocated, rng)
    print(
        f"{shape.name}: {shape.size / GiB:.2f} GiB, {allocated(src) / MiB:.0f} MiB allocated, "
        f"built in {time.perf_counter() - t:.1f} s",
        flush=True,
    )
    ours, cp = phase1(work, src, rounds)
    assert full_copy(src, dst, state_dir=state).digest == disk_digest(src), "phase 1 copy differs"
    print(describe("phase 1 ours (full_copy)", ours))
    print(describe("phase 1 cp --sparse=always", cp))
    r = shape.results
    r["phase1_vs_cp"] = statistics.median(cp) / statistics.median(ours)
    if phase1_only:
        remove(src, dst, state)
        return

    clone(dst, base)
    shutil.copytree(state, base_state)
    run(["cp", "--sparse=always", src, old_src])
    extents = change(src, shape, rng)
    changed, to_data = changed_bytes(old_src, src, extents)
    new_digest = disk_digest(src)

    times: dict[str, list[float]] = {"tracked": [], "digest": [], "rsync": [], "window": []}
    written: dict[str, int] = {}  # worst bytes written by each method over the rounds
    alloc: dict[str, int] = {}  # worst target allocation after each method
    lost: dict[str, int] = {}  # worst bytes allocated in the target where the source has a hole

    def ours_delta(method: str) -> None:
        restore(base, dst, base_state, state)
        out: dict[str, object] = {}

        def go() -> None:
            tracked = method == "tracked"  # as the switch's final delta: the replica is off (source_quiet)
            res = delta_copy(
                src,
                dst,
                state_dir=state,
                changed_extents=extents if tracked else None,
                durable=False,
                source_quiet=tracked,
            )
            proof = verify_changes(src, dst, state_dir=state)
            out["res"], out["proof"] = res, proof

        elapsed = timed(go, src, dst)
        res, proof = out["res"], out["proof"]
        assert res.digest == new_digest and proof.identical, f"{method} delta result differs from source"
        written[method] = max(written.get(method, 0), res.bytes_written)
        times[method].append(elapsed)
        alloc[method] = max(alloc.get(method, 0), allocated(dst))
        lost[method] = max(lost.get(method, 0), in_holes(dst, src))
        kept = alloc[method] <= allocated(src) and lost[method] == 0
        r["holes_kept"] = min(r.get("holes_kept", 1.0), 1.0 if kept else 0.0)

    def rsync_delta() -> None:
        rs = os.path.join(work, "rsync.img")
        run(["cp", "--sparse=always", old_src, rs])
        times["rsync"].append(timed(lambda: run(["rsync", "--inplace", "--no-whole-file", src, rs]), src, rs))
        remove(rs)

    steps = [lambda: ours_delta("tracked"), lambda: ours_delta("digest"), rsync_delta]
    for k in range(rounds):
        for step in steps[k % 3 :] + steps[: k % 3]:
            step()
    assert disk_digest(dst) == new_digest
    print(
        f"  change: {len(extents)} extents, {changed / MiB:.2f} MiB of 4 KiB pages changed "
        f"({to_data / MiB:.2f} MiB to data, {(changed - to_data) / MiB:.2f} MiB to zeros or discarded); correct: yes"
    )
    for k in sorted(written):
        amp = written[k] / to_data if to_data else 0.0
        print(
            f"  {k + ' delta':<38} wrote {written[k] / MiB:8.2f} MiB ({amp:.2f}x the pages changed to data); "
            f"target {alloc[k] / MiB:.2f} MiB allocated, source {allocated(src) / MiB:.2f} MiB, "
            f"target data in source holes {lost[k] / KiB:.0f} KiB"
        )
    print(describe("delta tracked + verify_changes", times["tracked"]))
    print(describe("delta digest + verify_changes", times["digest"]))
    print(describe("rsync --inplace --no-whole-file", times["rsync"]))
    r["phase2_tracked_vs_rsync"] = statistics.median(times["rsync"]) / statistics.median(times["tracked"])
    r["phase2_digest_vs_rsync"] = statistics.median(times["rsync"]) / statistics.median(times["digest"])
    r["write_amplification"] = max(written.values()) / to_data if to_data else 0.0
    remove(src, dst, state, base, base_state, old_src)


def windows(work: str, sizes: list[int], rng: random.Random, rounds: int) -> list[float]:
    """Median seconds of the switch's data window (tracked final delta + verify_changes), durable, per
    size. The sizes take turns, round by round, in an order that rotates: on this VM the window's reads
    of cached pages ran 2-6x slower for a minute or two at a time (the same change, the same bytes, no
    more page faults, a CPU-bound loop beside them unchanged), so measuring every round of one size
    before the next size blamed those spells on whichever size they fell on."""
    disks = []
    for size in sizes:
        src, dst, state = (os.path.join(work, f"w{size}-{n}") for n in ("src.img", "dst.img", "state"))
        build(src, size, 0.10, rng)
        # Durable, as the portal runs its passes: a pass that does not flush seals the target before ext4
        # allocates its delayed writes, and the extent-tree blocks that allocation adds count in
        # st_blocks, so the seal breaks later and the timed delta re-reads the whole target (1.9 s on
        # 16 GiB, not 0.06 s).
        full_copy(src, dst, state_dir=state)
        disks.append((size, src, dst, state))
    xs: dict[int, list[float]] = {size: [] for size in sizes}
    for k in range(rounds):
        for size, src, dst, state in disks[k % len(disks) :] + disks[: k % len(disks)]:
            # Round k's change is the same on every size, and differs from the other rounds' (the same
            # change again rewrites identical bytes: a delta that writes nothing). Other writers' dirty
            # data is flushed first, so the window's own flushes wait for its writes only. Then both
            # files' pages are dropped and their data read back in: every round of every size starts
            # with exactly the data cached and none of the holes. Without the drop, pages of holes and
            # of the target that earlier rounds had read or written stayed cached, most likely far more
            # of them around a 1 GiB disk's changes than a 16 GiB disk's: for the same bytes, the 16 GiB
            # windows spent 13x the kernel's copy time in pwrite and 10x its zero-fill in reads (perf
            # record, 15 windows each), and window_growth came out 1.47-1.62 in four runs without the
            # drop, 1.23-1.32 in two with it (one machine, one hour).
            shape = Shape("w", size, 0, 64, (64 * KiB, 64 * KiB))
            extents = change(src, shape, random.Random(7 + k), discards=False)
            os.sync()
            drop(src, dst)
            warm(src, dst)
            t = time.perf_counter()
            delta_copy(src, dst, state_dir=state, changed_extents=extents, source_quiet=True)
            proof = verify_changes(src, dst, state_dir=state)
            xs[size].append(time.perf_counter() - t)
            assert proof.identical
            change(src, shape, random.Random(rng.random()), discards=False)
            delta_copy(src, dst, state_dir=state, changed_extents=None)  # in sync again (durable: see above)
    for size, src, dst, state in disks:
        remove(src, dst, state)
        print(describe(f"switch data window, {size / GiB:.2f} GiB", xs[size]))
    return [statistics.median(xs[size]) for size in sizes]


def paired_delta(d: tuple) -> float:
    """One session's tracked final delta and verification (see pair()); seconds."""
    src, dst, state, _, _, extents, digest = d
    t = time.perf_counter()
    res = delta_copy(src, dst, state_dir=state, changed_extents=extents, durable=False, source_quiet=True)
    proof = verify_changes(src, dst, state_dir=state)
    took = time.perf_counter() - t
    assert res.digest == digest and proof.identical, "a paired delta differs from its source"
    return took


def pair(work: str, rng: random.Random, rounds: int, quick: bool) -> float:
    """Two sessions doing the same thing at once: the random shape's tracked final delta (+
    verify_changes) on two disks of their own, each alone and then both together in two processes,
    alternated; each result must equal its source. Returns the median of together / alone."""
    shape = next(s for s in shapes(quick) if s.name == "random")
    disks = []
    for n in ("a", "b"):
        src, dst, state, base, base_state = (
            os.path.join(work, f"p{n}-{x}") for x in ("src.img", "dst.img", "state", "base.img", "base-state")
        )
        build(src, shape.size, shape.allocated, rng)
        full_copy(src, dst, state_dir=state, durable=False)
        clone(dst, base)
        shutil.copytree(state, base_state)
        extents = change(src, shape, rng)
        disks.append((src, dst, state, base, base_state, extents, disk_digest(src)))

    def ready(d: tuple) -> None:  # phase 1's result back, and both images cached
        src, dst, state, base, base_state = d[:5]
        restore(base, dst, base_state, state)
        os.sync()
        warm(src, dst)

    alone: list[float] = []
    together: list[float] = []
    for _ in range(rounds):
        for d in disks:
            ready(d)
            alone.append(paired_delta(d))
        for d in disks:
            ready(d)
        with multiprocessing.get_context("spawn").Pool(2) as pool:  # two workers, as two sessions' tasks
            together.extend(pool.map(paired_delta, disks))
    for d in disks:
        remove(*d[:5])
    print(describe("tracked delta alone (each)", alone))
    print(describe("tracked delta, two sessions at once", together))
    slowdown = statistics.median(together) / statistics.median(alone)
    print(f"two sessions at once: each {slowdown:.2f}x its time alone; both results identical to their source")
    return slowdown


def bandwidth(work: str) -> None:
    """The limiter against the wall clock (the unit test checks its arithmetic on a fake clock)."""
    src, dst, state = (os.path.join(work, n) for n in ("b-src.img", "b-dst.img", "b-state"))
    build(src, 64 * MiB, 0.5, random.Random(3))
    limit = 16e6
    res = full_copy(src, dst, state_dir=state, bandwidth_limit_bps=limit, durable=False)
    print(
        f"bandwidth limit {limit / 1e6:.0f} MB/s: achieved {res.bytes_written / res.seconds / 1e6:.2f} MB/s "
        f"over {res.seconds:.2f} s"
    )
    remove(src, dst, state)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="sizes and changes divided by 16")
    parser.add_argument("--shapes", default="sparse,dense,random,sweep")
    parser.add_argument("--rounds", type=int, default=int(os.environ.get("BENCH_ROUNDS", "3")))
    parser.add_argument("--bandwidth", action="store_true", help="also time the bandwidth limiter")
    parser.add_argument("--pair", action="store_true", help="also two sessions' tracked deltas at once")
    parser.add_argument("--phase1-only", action="store_true", help="phase 1 against cp only (no deltas)")
    args = parser.parse_args()
    wanted = set(args.shapes.split(","))
    base_dir = os.environ.get("BENCH_DIR") or tempfile.gettempdir()
    work = tempfile.mkdtemp(prefix="failback-bench-", dir=base_dir)
    rng = random.Random(20240603)
    done: list[Shape] = []
    growth = None
    try:
        for shape in shapes(args.quick):
            if shape.name in wanted:
                bench_shape(work, shape, rng, args.rounds, args.phase1_only)
                done.append(shape)
        if "sweep" in wanted:
            d = 16 if args.quick else 1
            sizes = [GiB // d, 4 * GiB // d, 16 * GiB // d]
            medians = windows(work, sizes, rng, args.rounds)
            growth = medians[-1] / medians[0]
            for s, w in zip(sizes, medians, strict=True):
                print(f"sweep {s / GiB:.2f} GiB: switch data window {w:.3f} s")
        if args.bandwidth:
            bandwidth(work)
        if args.pair:
            pair(work, rng, args.rounds, args.quick)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    worst = {
        k: min((s.results[k] for s in done if k in s.results), default=float("nan"))
        for k in ("phase1_vs_cp", "phase2_tracked_vs_rsync", "phase2_digest_vs_rsync")
    }
    amp = max(
        (s.results["write_amplification"] for s in done if "write_amplification" in s.results), default=float("nan")
    )
    holes = all(s.results.get("holes_kept", 0) == 1.0 for s in done)
    print(
        f"phase1_vs_cp={worst['phase1_vs_cp']:.2f} "
        f"phase2_tracked_vs_rsync={worst['phase2_tracked_vs_rsync']:.1f} "
        f"phase2_digest_vs_rsync={worst['phase2_digest_vs_rsync']:.1f} "
        f"peak_rss_mib={peak:.0f} "
        f"window_growth={growth if growth is not None else float('nan'):.2f} "
        f"write_amplification={amp:.2f} "
        f"holes_kept={'yes' if holes else 'no'}" + (" (quick shapes)" if args.quick else "")
    )


if __name__ == "__main__":
    main()
