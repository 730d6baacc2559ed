"""is_zero runs memcmp without the GIL while other threads may replace the shared zero buffer."""

import subprocess
import sys
import textwrap

from .conftest import ROOT

STRESS = textwrap.dedent("""
    import threading
    import failback.transfer.sparse as sp
    bufs = [bytearray(n) for n in (4096, 1 << 20, 4 << 20, 8 << 20)]
    def run(i):
        for k in range(3000):
            assert sp.is_zero(bufs[(i + k) % len(bufs)])
            if k % 50 == 0:
                sp._zero_buf = bytearray(0)  # make the next caller grow (replace) it
    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    print("ok")
""")


def test_it_survives_zero_checks_racing_a_growing_zero_buffer():
    # In a child process: the bug it guards against was a segmentation fault (exit -11), not an exception.
    result = subprocess.run([sys.executable, "-c", STRESS], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", (result.returncode, result.stderr[-2000:])
