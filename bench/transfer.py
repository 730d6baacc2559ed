"""Transfer engine benchmark (issue 3): phase 1 against cp, phase 2 against rsync, peak memory.

Run: .venv/bin/python bench/transfer.py            (BENCH_DIR=... to choose where the images go)

Builds a 2 GiB sparse image, half of it allocated (random data in 4 MiB extents), then measures
- phase 1: full_copy vs `cp --sparse=always`, alternated (who goes first alternates too), 7 runs
  each after a warm-up round;
- phase 2 after 20 scattered 1 MiB writes: delta_copy with the extents (tracked), delta_copy by digest
  comparison, and `rsync --inplace --no-whole-file` of the changed image onto the old copy;
- the peak RSS of this process (the engine runs in it; cp and rsync are children, not counted).
Every timed run starts after os.sync(), with the source in the page cache. Neither cp nor rsync
flushes its output, so the engine runs with durable=False here (one durable run is shown apart).
The last line is the summary the issue asks for.
"""

from __future__ import annotations

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

import blake3

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from failback.transfer import delta_copy, disk_digest, full_copy  # noqa: E402

SIZE = 2 << 30
EXTENT = 4 << 20
ROUNDS_PHASE1 = int(os.environ.get("BENCH_ROUNDS_PHASE1", "7"))
ROUNDS_PHASE2 = int(os.environ.get("BENCH_ROUNDS_PHASE2", "3"))
CHANGES = 20
CHANGE_SIZE = 1 << 20


def build_image(path: str, rng: random.Random) -> None:
    n = SIZE // EXTENT
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, SIZE)
        for i in sorted(rng.sample(range(n), n // 2)):
            os.pwrite(fd, blake3.blake3(rng.randbytes(16)).digest(length=EXTENT), i * EXTENT)
    finally:
        os.close(fd)


def change_image(path: str, rng: random.Random) -> list[tuple[int, int]]:
    slots = rng.sample(range(SIZE // CHANGE_SIZE), CHANGES)
    extents = sorted((s * CHANGE_SIZE, CHANGE_SIZE) for s in slots)
    fd = os.open(path, os.O_WRONLY)
    try:
        for off, length in extents:
            os.pwrite(fd, blake3.blake3(rng.randbytes(16)).digest(length=length), off)
    finally:
        os.close(fd)
    return extents


def remove(*paths: str) -> None:
    for p in paths:
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.unlink(p)


def timed(fn: Callable[[], object]) -> float:
    os.sync()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True)


def describe(name: str, xs: list[float]) -> str:
    runs = " ".join(f"{x:.3f}" for x in xs)
    med = statistics.median(xs)
    return f"{name:<40} median {med:6.3f} s  min {min(xs):6.3f}  max {max(xs):6.3f}  runs: {runs}"


def main() -> None:
    base_dir = os.environ.get("BENCH_DIR") or tempfile.gettempdir()
    work = tempfile.mkdtemp(prefix="failback-bench-", dir=base_dir)
    rng = random.Random(20240603)
    try:
        src = os.path.join(work, "src.img")
        dst = os.path.join(work, "dst.img")
        cpy = os.path.join(work, "cp.img")
        state = os.path.join(work, "state")
        t = time.perf_counter()
        build_image(src, rng)
        st = os.stat(src)
        built = time.perf_counter() - t
        print(f"image: {SIZE >> 20} MiB, {st.st_blocks * 512 >> 20} MiB allocated, built in {built:.1f} s")

        # ---- phase 1
        ours: list[float] = []
        cp: list[float] = []

        def ours_full() -> None:
            remove(dst, state)
            ours.append(timed(lambda: full_copy(src, dst, state_dir=state, durable=False)))

        def cp_full() -> None:
            remove(cpy)
            cp.append(timed(lambda: run(["cp", "--sparse=always", src, cpy])))

        for r in range(ROUNDS_PHASE1 + 1):  # round 0 warms up (page cache, allocator) and is dropped
            for fn in (ours_full, cp_full) if r % 2 == 0 else (cp_full, ours_full):
                fn()
            if r == 0:
                ours.clear()
                cp.clear()
        remove(cpy)
        src_digest = disk_digest(src)
        copy_digest = full_copy(src, dst, state_dir=state).digest  # the completed copy: returns at once
        assert copy_digest == src_digest == disk_digest(dst), "phase 1 copy differs from source"
        dst_alloc = os.stat(dst).st_blocks * 512
        print(describe("phase 1 ours (full_copy)", ours))
        print(describe("phase 1 cp --sparse=always", cp))
        print(f"phase 1 target allocated: {dst_alloc >> 20} MiB (source {st.st_blocks * 512 >> 20} MiB)")
        remove(dst, state)
        durable = timed(lambda: full_copy(src, dst, state_dir=state, durable=True))
        cp_sync = timed(lambda: (run(["cp", "--sparse=always", src, cpy]), os.sync()))
        print(f"phase 1 flushed (1 run each): ours durable=True {durable:.3f} s, cp + sync {cp_sync:.3f} s")
        remove(cpy)

        # ---- phase 2: dst + state now hold the old image; keep them as the baseline to restore
        base = os.path.join(work, "base.img")
        base_state = os.path.join(work, "base-state")
        run(["cp", "--sparse=always", dst, base])
        shutil.copytree(state, base_state)
        extents = change_image(src, rng)
        new_digest = disk_digest(src)

        def restore() -> None:  # same inode for dst (cp rewrites in place), state as after phase 1
            run(["cp", "--sparse=always", base, dst])
            remove(state)
            shutil.copytree(base_state, state)

        tracked: list[float] = []
        digest: list[float] = []
        rsync: list[float] = []
        written: dict[str, int] = {}

        def ours_delta(extents_or_none: list[tuple[int, int]] | None, out: list[float]) -> None:
            restore()
            result = None

            def go() -> None:
                nonlocal result
                result = delta_copy(src, dst, state_dir=state, changed_extents=extents_or_none, durable=False)

            out.append(timed(go))
            assert result is not None and result.digest == new_digest, "delta result differs from source"
            written[result.method] = result.bytes_written

        def rsync_delta() -> None:
            rs = os.path.join(work, "rsync.img")
            run(["cp", "--sparse=always", base, rs])
            rsync.append(timed(lambda: run(["rsync", "--inplace", "--no-whole-file", src, rs])))
            remove(rs)

        steps = [lambda: ours_delta(extents, tracked), lambda: ours_delta(None, digest), rsync_delta]
        for r in range(ROUNDS_PHASE2):
            for step in steps[r % 3 :] + steps[: r % 3]:
                step()
        assert disk_digest(dst) == new_digest
        print(f"phase 2 change: {CHANGES} x {CHANGE_SIZE >> 20} MiB; bytes written: "
              + ", ".join(f"{k} {v >> 20} MiB" for k, v in sorted(written.items())))
        print(describe("phase 2 ours tracked (extents)", tracked))
        print(describe("phase 2 ours digest comparison", digest))
        print(describe("phase 2 rsync --inplace --no-whole-file", rsync))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    med = statistics.median
    print(
        f"phase1_vs_cp={med(cp) / med(ours):.2f} "
        f"phase2_tracked_vs_rsync={med(rsync) / med(tracked):.1f} "
        f"phase2_digest_vs_rsync={med(rsync) / med(digest):.1f} "
        f"peak_rss_mib={peak:.0f}"
    )


if __name__ == "__main__":
    main()
