"""The benchmark's memory sampler sees a child process's memory, per kind of process too."""

import subprocess
import sys
import time

from jobs.bench.memory import PeakMemory


def test_peak_memory_counts_a_child_process():
    code = "import numpy as np, time; a = np.ones(200 * 2**20 // 8); time.sleep(1.5)"
    with PeakMemory(every_s=0.05) as mem:
        child = subprocess.Popen([sys.executable, "-c", code])
        time.sleep(0.2)
        child.wait()
    assert mem.peak_rss > 200 * 2**20 and mem.peak_pss > 200 * 2**20
    assert mem.pss_samples >= 2
    # The child's share is filed under its executable's name, beside the consumer's.
    assert "bench (consumer)" in mem.peak_pss_by_name
    others = {k: v for k, v in mem.peak_pss_by_name.items() if k != "bench (consumer)"}
    assert max(others.values()) > 200 * 2**20
