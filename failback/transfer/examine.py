"""Examining a block of a delta (on the pool, or in the calling thread for a few grains): reading its
grains from the source, their leaves, and the plan of what to write, punch and give back for each
grain the target does not hold yet; and, over NBD, the block's reads asked ahead (:class:`Reads`).
The pass that applies the plans is :mod:`.delta`.

In a quiet tracked delta from a file (the switch's final delta), a named grain both sides held alike
is read (whole, or at its named pages if it read all zeros at the last pass) and hashed in one of the
thread's grain buffers (:meth:`.Pass.grain_scratches`), and the block's buffer gets its named pages
only, all the rest of :func:`examine` reads of it (see _named_pages), or the grain whole where its
spare pages will be looked for (a named page of zeros, or a grain that has not changed: see
_spare_pages). Read into the block's buffer, a grain of zeros cost a 64 KiB fill and a 64 KiB zero
check, and one of data a 64 KiB copy, all in a buffer cold at every block (:func:`_read_named`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from collections.abc import Set as AbstractSet

from .blockio import PAGE, grain_runs, has_hole, zero_page_runs
from .blockmap import LEAF, ZERO_LEAF, leaf_of, leaves_of
from .nbd import Flight, NbdDisk, NbdError
from .passes import Hashed, Job, Pass
from .sparse import data_extents, is_zero

Pages = list[tuple[int, int, bool]]  # page runs, each flagged when it is zeros (see zero_page_runs)


def examine(p: Pass, job: Job, buf: bytearray, reads: Reads | None = None) -> Hashed:
    """Read the job's grains from the source (or wait for the reads started), compute their leaves,
    and plan what to write for each grain the target does not hold yet (comparing with the target
    where needed)."""
    g_size = p.grain
    out = Hashed()
    whole_block = job.read and len(job.grains) == len(job.old_target) // LEAF
    known: dict[int, tuple[bytes, Pages, bool]] = {}  # grain -> new leaf, named pages, one of zeros
    if reads is None and job.changed and not whole_block and type(p.src_fd) is int:
        known, fetched = _read_named(p, job, buf, out), None
    else:
        fetched = _read_source(p, job, buf, out, reads)
    if whole_block:  # the whole block (digest method)
        leaves = leaves_of(buf, 0, job.length, g_size)
        if leaves == job.old_target:  # in sync: no per-grain plan (most blocks of a digest delta)
            out.leaves = leaves
            out.spare = _spare_pages(p, job, buf, out.plans)
            if out.spare:
                _io_runs(job, buf, out, g_size)
            return out
    view = memoryview(buf)
    settled: set[int] = set()  # named grains whose named pages all hold data: no space to give back
    read, length, old_target, old_source, changed = job.read, job.length, job.old_target, job.old_source, job.changed
    new, plans = out.new, out.plans
    for g in job.grains:  # per grain of a tracked delta: kept lean, it runs 10,000 times for 10,000 writes
        a = g * g_size
        b = a + g_size if a + g_size < length else length
        if (got := known.get(g)) is not None:
            leaf, pages, zero_named = got
        else:
            leaf = leaf_of(view[a:b]) if read and not is_zero(buf, a, b) else ZERO_LEAF
            pages, zero_named = None, None
        new[g] = leaf
        k = g * LEAF
        old_t = old_target[k : k + LEAF]
        if leaf == old_t:
            continue  # the target holds it already
        if leaf == ZERO_LEAF:
            plans[g] = None
        elif changed and (named := changed.get(g)) and old_t == old_source[k : k + LEAF]:
            plans[g], zero_named, compared, cut = _named_pages(
                p, job, buf, named, target_zero=old_t == ZERO_LEAF, fetched=fetched, pages=pages, zero_named=zero_named
            )
            if cut is not None:
                out.cut[g] = cut
            if not zero_named:
                settled.add(g)
            out.target_read += compared
        elif old_t == ZERO_LEAF:  # the target grain is zeros: write the source's non-zero pages
            plans[g] = [(x, y) for x, y, zero in zero_page_runs(buf, a, b) if not zero]
        else:
            plans[g] = _differing_pages(p, job, buf, [(a, b)])
            out.target_read += b - a
    out.spare = _spare_pages(p, job, buf, out.plans, settled)
    if out.plans or out.spare:
        _io_runs(job, buf, out, g_size)
    return out


class Reads:
    """A block's reads over NBD, asked for and not yet waited for: the source's grains, and the
    production disk's named pages a quiet tracked delta will compare (those of grains both sides held
    alike, not zeros), in one round trip together. Started by ``first`` for the blocks of the window,
    so the reads of the blocks behind the one being written are in flight meanwhile: a round trip is
    0.1 ms here, and the switch window over NBD was mostly round trips, one after the other."""

    def __init__(self, p: Pass, job: Job, buf: bytearray) -> None:
        base = job.offset
        runs = _source_runs(p, job, buf) if job.read else []
        ahead: list[tuple[int, int, int]] = []  # (x, y, place in self.target)
        if isinstance(p.dst_fd, NbdDisk) and job.changed:
            q = 0
            for g, named in job.changed.items():
                old_t = job.old_target[g * LEAF : (g + 1) * LEAF]
                if old_t != ZERO_LEAF and old_t == job.old_source[g * LEAF : (g + 1) * LEAF]:
                    for x, y in named:
                        ahead.append((x, y, q))
                        q += y - x
        self.target = bytearray(ahead[-1][2] + ahead[-1][1] - ahead[-1][0]) if ahead else bytearray()
        self.at = {x: q for x, _, q in ahead}  # named run start -> its place in self.target
        self.target_read = len(self.target)
        self.source_read = sum(y - x for x, y in runs)
        self.flights: list[Flight] = []
        try:
            if ahead:
                self.flights.append(p.dst_fd.start_reads(memoryview(self.target), base, ahead))
            if isinstance(p.src_fd, NbdDisk) and runs:
                self.flights.append(p.src_fd.start_reads(memoryview(buf), base, [(x, y, x) for x, y in runs]))
            else:
                for x, y in runs:
                    p.read(p.src_fd, buf, x, y, base)
        except BaseException:
            self.wait(quiet=True)
            raise

    def wait(self, *, quiet: bool = False) -> None:
        """Until every read has landed (each, even after an error: the buffers are in use until then);
        then the first error, unless quiet."""
        failed = None
        for flight in self.flights:
            try:
                flight.wait()
            except NbdError as exc:
                failed = failed or exc
        self.flights = []
        if failed is not None and not quiet:
            raise failed

    def fetched(self) -> tuple[bytearray, dict[int, int]] | None:
        return (self.target, self.at) if self.at else None


def _read_source(
    p: Pass, job: Job, buf: bytearray, out: Hashed, reads: Reads | None
) -> tuple[bytearray, dict[int, int]] | None:
    """The job's grains from the source into buf (by the reads ``first`` started, over NBD), counted in
    out.source_read; the production disk's named pages read with them, if any (see Reads), counted in
    out.target_read."""
    if reads is None:
        if not job.read:
            return None
        runs = _source_runs(p, job, buf)
        for x, y in runs:
            p.read(p.src_fd, buf, x, y, job.offset)
        out.source_read = sum(y - x for x, y in runs)
        return None
    reads.wait()
    out.source_read = reads.source_read
    out.target_read += reads.target_read
    return reads.fetched()


def _read_named(p: Pass, job: Job, buf: bytearray, out: Hashed) -> dict[int, tuple[bytes, Pages, bool]]:
    """The job's grains from a source file into buf, as :func:`_read_source` reads them in a quiet tracked
    delta, but the named grains both sides held alike in a grain buffer (module's docstring). Returns their
    new leaves (a grain over a hole is zeros if its named pages are), named pages cut, and any zero named."""
    g_size, length, changed, base, src = p.grain, job.length, job.changed or {}, job.offset, p.src_fd
    old_source, old_target = job.old_source, job.old_target
    hole, data = p.grain_scratches()  # hole: all zeros between uses
    hole_v, data_v = memoryview(hole), memoryview(data)
    view, zeros, preadv = memoryview(buf), p.zeros, os.preadv
    known: dict[int, tuple[bytes, Pages, bool]] = {}
    rest: list[int] = []  # grains read into buf by _source_runs
    read = 0
    for g in job.grains:  # kept lean, as examine's loop: it runs once per scattered write
        a = g * g_size
        b = a + g_size if a + g_size < length else length
        k = g * LEAF
        old = old_source[k : k + LEAF]
        named = changed.get(g)
        if not named or old != old_target[k : k + LEAF]:
            rest.append(g)
            continue
        if old == ZERO_LEAF:
            grain, g_view = hole, hole_v
            try:
                for x, y in named:  # a short read is read on by Pass.read (or fails there)
                    if preadv(src, [hole_v[x - a : y - a]], base + x) != y - x:
                        p.read(src, hole, x - a, y - a, base + a)
                    read += y - x
            except BaseException:
                hole[:] = zeros[: len(hole)]
                raise
        else:
            grain, g_view = data, data_v
            if preadv(src, [data_v[: b - a]], base + a) != b - a:
                p.read(src, data, 0, b - a, base + a)
            read += b - a
        if len(named) == 1:
            x, y = named[0]
            view[x:y] = g_view[x - a : y - a]
            pages = zero_page_runs(buf, x, y)
        else:
            for x, y in named:
                view[x:y] = g_view[x - a : y - a]
            pages = [(u, v, zero) for x, y in named for u, v, zero in zero_page_runs(buf, x, y)]
        if len(pages) == 1:  # most often: one page named
            zero_named = all_zero = pages[0][2]
        else:
            zero_named, all_zero = any(run[2] for run in pages), all(run[2] for run in pages)
        leaf = ZERO_LEAF if (all_zero if grain is hole else is_zero(grain, 0, b - a)) else leaf_of(g_view[: b - a])
        if zero_named or leaf == old:
            view[a:b] = g_view[: b - a]
        known[g] = leaf, pages, zero_named
        if grain is hole:
            for x, y in named:
                hole[x - a : y - a] = zeros[: y - x]
    for x, y in _source_runs(p, job, buf, rest) if rest else ():
        p.read(src, buf, x, y, base)
        read += y - x
    out.source_read = read
    return known


def _source_runs(p: Pass, job: Job, buf: bytearray, grains: list[int] | None = None) -> list[tuple[int, int]]:
    """The source's runs to read for the job's grains (or ``grains`` of them), adjacent ones merged: the grains whole, except
    in a quiet tracked delta (``job.changed``), where a grain read all zeros at the last pass (a hole,
    mostly) has since changed at its named pages only, so only those are read and the rest is zeros,
    filled here (as change tracking is trusted for the grains it does not name at all). Read whole
    through the page cache, such a grain cost a page allocated and zeroed per 4 KiB of hole: with
    10,000 scattered 4 KiB writes, half of them in holes, 0.67-0.99 s of reads once the kernel had
    reclaimed those pages, against 0.09 s cached; over NBD, 60 KiB of zeros sent per grain."""
    g_size, length, changed, old_source = p.grain, job.length, job.changed, job.old_source
    grains = job.grains if grains is None else grains
    if not changed:
        return [(g0 * g_size, min(g1 * g_size, length)) for g0, g1 in grain_runs(grains)]
    view, zeros = memoryview(buf), p.zeros
    parts: list[tuple[int, int]] = []
    for g in grains:
        a = g * g_size
        b = a + g_size if a + g_size < length else length
        named = changed.get(g)
        if named and old_source[g * LEAF : (g + 1) * LEAF] == ZERO_LEAF:
            view[a:b] = zeros[: b - a]
            parts += named
        else:
            parts.append((a, b))
    return _merged(parts)


def _io_runs(job: Job, buf: bytearray, h: Hashed, g_size: int) -> None:
    """The block's writes (non-zero planned pages) and punches (zero planned pages, grains punched
    whole, spare pages), each merged into as few runs as they allow: a punch costs ext4 0.2 ms, and
    5 ms while other writers keep its journal committing, whatever its length. Done on the pool, so
    the calling thread, through which every block passes, only writes and reads back."""
    zeros, cut = list(h.spare), h.cut
    for g, plan in h.plans.items():
        if plan is None:
            a, b = g * g_size, min((g + 1) * g_size, job.length)
            zeros.append((a, b))
            h.zero_grains += b - a
            continue
        runs = cut.get(g)
        for u, v, zero in runs if runs is not None else (r for x, y in plan for r in zero_page_runs(buf, x, y)):
            (zeros if zero else h.writes).append((u, v))
    h.writes, h.zeros = _merged(h.writes), _merged(zeros)


def _spare_pages(
    p: Pass,
    job: Job,
    buf: bytearray,
    plans: dict[int, list[tuple[int, int]] | None],
    settled: AbstractSet[int] = frozenset(),
) -> list[tuple[int, int]]:
    """The page runs (relative to the block) of the examined grains that the target allocates where the
    source has a hole, and that read as zeros in the source: space the target holds and the source gave
    back (a guest's discard, or zeros phase 1 copied). Punched once their grain is right, they change
    no byte, and the target is never more allocated than the source. A block without a hole in the
    source costs one lseek; grains punched whole are left out, and so are the ``settled`` ones: named
    grains of a quiet tracked delta that were in sync, whose named pages all hold data (the target
    allocated no more than the source there at the last pass, and only named pages changed since)."""
    g_size = p.grain
    examined = {g for g in job.grains if plans.get(g, ()) is not None and g not in settled}
    if not examined:
        return []
    lo, hi = min(examined) * g_size, min((max(examined) + 1) * g_size, job.length)
    base = job.offset
    if job.read and not has_hole(p.src_fd, base + lo, base + hi):
        return []
    target = [(a - base, b - base) for a, b in data_extents(p.dst_fd, base + lo, base + hi)]
    if not target:
        return []
    source = [(a - base, b - base) for a, b in data_extents(p.src_fd, base + lo, base + hi)] if job.read else []
    runs: list[tuple[int, int]] = []
    for x, y in _minus(target, source):
        x = -(-x // PAGE) * PAGE
        y = y if y == job.length else y - y % PAGE  # a short last page only at the end of the disk
        for page in range(x, y, PAGE):
            stop = min(page + PAGE, y)
            if page // g_size not in examined or (job.read and not is_zero(buf, page, stop)):
                continue
            if runs and runs[-1][1] == page:
                runs[-1] = (runs[-1][0], stop)
            else:
                runs.append((page, stop))
    return runs


def _minus(have: list[tuple[int, int]], holes_of: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """The parts of the sorted ranges ``have`` outside the sorted ranges ``holes_of``."""
    k = 0
    for a, b in have:
        while k < len(holes_of) and holes_of[k][1] <= a:
            k += 1
        j = k
        while a < b:
            if j >= len(holes_of) or holes_of[j][0] >= b:
                yield a, b
                break
            if holes_of[j][0] > a:
                yield a, holes_of[j][0]
            a = max(a, holes_of[j][1])
            j += 1


def _named_pages(
    p: Pass,
    job: Job,
    buf: bytearray,
    runs: list[tuple[int, int]],
    *,
    target_zero: bool,
    fetched: tuple[bytearray, dict[int, int]] | None = None,
    pages: Pages | None = None,
    zero_named: bool | None = None,
) -> tuple[list[tuple[int, int]], bool, int, Pages | None]:
    """A grain both sides held alike at the last pass, whose leaf has changed since, the source quiet:
    only the pages change tracking names can differ. Returns the pages to write (or punch), whether a
    named page is zeros, the bytes read on the target to compare, and the pages to write cut by
    zero_page_runs when they are known here (else None: _io_runs cuts them). The pages planned: where the
    target grain was zeros, the named non-zero ones, nothing read; where one page is named, that page,
    nothing read (the grain differs, and nothing else in it can: one read of 4 KiB saved per scattered
    write); else the named pages that differ from the target's, read there only. ``pages``: the named
    runs cut by zero_page_runs, and ``zero_named``, when the caller has them."""
    if pages is None:
        pages = [(u, v, zero) for x, y in runs for u, v, zero in zero_page_runs(buf, x, y)]
    if zero_named is None:
        zero_named = any(zero for _, _, zero in pages)
    if target_zero:
        data = [run for run in pages if not run[2]] if zero_named else pages
        return [(u, v) for u, v, _ in data], zero_named, 0, data
    if len(runs) == 1 and runs[0][1] - runs[0][0] <= PAGE:
        return list(runs), zero_named, 0, pages
    if fetched is not None:  # read already, with the source's grains (see _read_source)
        t, at = fetched
        view, out = memoryview(buf), []
        for x, y in runs:
            _differing(t, x - at[x], view, x, y, out)
        return out, zero_named, 0, None
    return _differing_pages(p, job, buf, runs), zero_named, sum(y - x for x, y in runs), None


def _differing_pages(p: Pass, job: Job, buf: bytearray, runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The page runs within the runs of buf that differ from the target's bytes there, each run read
    on the target and compared in halves (one changed page in a grain costs 9 comparisons, not 17)."""
    t, view, out = p.scratch(max((y - x for x, y in runs), default=0)), memoryview(buf), []
    for x, y in runs:
        p.read(p.dst_fd, t, 0, y - x, job.offset + x)
        _differing(t, x, view, x, y, out)
    return out


def _differing(t: bytearray, base: int, view: memoryview, x: int, y: int, runs: list[tuple[int, int]]) -> None:
    """Append to runs the page runs of view[x:y] that differ from t (t[0] is view[base]), in order."""
    if t.startswith(view[x:y], x - base):
        return
    if y - x <= PAGE:
        if runs and runs[-1][1] == x:
            runs[-1] = (runs[-1][0], y)
        else:
            runs.append((x, y))
        return
    mid = x + (y - x + PAGE) // (2 * PAGE) * PAGE
    _differing(t, base, view, x, mid, runs)
    _differing(t, base, view, mid, y, runs)


def _merged(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Runs sorted, with those that touch or overlap joined."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(runs):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out
