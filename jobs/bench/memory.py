"""Peak memory of a benchmark's process tree: summed RSS and PSS (its physical memory), sampled in a thread."""

from __future__ import annotations

import threading
import time
from pathlib import Path


def _process_name(p) -> str:
    """A short name for a process of the tree: Ray's processes by role (`ray::ReadSomaTokens...`, raylet,
    gcs_server), others by executable."""
    cmd = p.cmdline()
    if not cmd:
        return p.name()
    if cmd[0].startswith("ray::"):
        return cmd[0].split()[0]
    return next(
        (Path(c).name for c in cmd if "raylet" in c or "gcs_server" in c), Path(cmd[0]).name
    )


def _tree_memory(procs: list, pss: bool, by_name: dict[str, int] | None = None) -> tuple[int, int]:
    """(summed RSS, summed PSS or 0) of `procs` (a process, first, and its descendants). RSS counts a shared
    page (Ray's object store, mapped by the driver, raylet and workers) once per process; PSS splits it among
    them, so the PSS sum is the tree's physical memory. PSS reads /proc/<pid>/smaps_rollup: costly, so sampled less often.
    With `by_name`, the PSS of each sample is also summed per process name into `by_name` (its peak kept)."""
    import psutil

    rss_sum = pss_sum = 0
    now: dict[str, int] = {}
    for p in procs:
        try:
            if pss:
                info = p.memory_full_info()
                rss_sum, pss_sum = rss_sum + info.rss, pss_sum + info.pss
                if by_name is not None:
                    name = "bench (consumer)" if p.pid == procs[0].pid else _process_name(p)
                    now[name] = now.get(name, 0) + info.pss
            else:
                rss_sum += p.memory_info().rss
        except psutil.Error:
            pass
    if by_name is not None:
        for name, v in now.items():
            by_name[name] = max(by_name.get(name, 0), v)
    return rss_sum, pss_sum


def _own_rss_parts() -> tuple[int, int]:
    """(RssShmem, RssAnon) of this process in bytes, from /proc/self/status; (0, 0) elsewhere."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return tuple(int(fields[k].split()[0]) * 1024 for k in ("RssShmem", "RssAnon"))
    except (OSError, KeyError, ValueError):
        return 0, 0


class PeakMemory:
    """Peak summed RSS (every `every_s`) and PSS of this process tree.

    PSS costs a walk of every process's page tables: at 0.1 s it took ~12% of the 2 cores from a 1M-cell
    run of our stream (perf: `smaps_account`), slowing what it measured. So PSS is read every `pss_every`
    samples and, in between, whenever the summed RSS is within `near` of its peak so far and 1% above what
    it was at the last PSS read (at most every other sample): the PSS peak comes with the RSS highs (the
    read workers' transient arrays count fully in both), and a short epoch still gets its peaks sampled.
    Without the 1% rule an RSS plateau near its peak had PSS read every other sample: 44% of the bench
    process's CPU in a 500k-cell run of our stream. `pss_samples` says how often it was read.
    """

    def __init__(self, every_s: float = 0.05, pss_every: int = 10, near: float = 0.97):
        import psutil

        self.proc, self.every, self.pss_every, self.near = (
            psutil.Process(),
            every_s,
            pss_every,
            near,
        )
        self.peak_rss = self.peak_pss = self.pss_samples = 0
        self.peak_own_shmem = self.peak_own_anon = 0
        """Peaks of this (the consuming) process's own RSS parts, bytes: pages of shared memory it has mapped
        and touched (Ray's object store) and its private heap (`RssShmem` / `RssAnon`); Linux only."""
        self.peak_pss_by_name: dict[str, int] = {}
        """Peak PSS (bytes) of each kind of process in the tree (`_process_name`), over the PSS samples."""
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)

    def _sample(self, pss: bool) -> int:
        shmem, anon = _own_rss_parts()
        self.peak_own_shmem, self.peak_own_anon = (
            max(self.peak_own_shmem, shmem),
            max(self.peak_own_anon, anon),
        )
        procs = [self.proc, *self.proc.children(recursive=True)]
        rss, p = _tree_memory(procs, pss, self.peak_pss_by_name)
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, p)
        self.pss_samples += pss
        return rss

    def _run(self) -> None:
        i, last_pss, pss_rss = 0, -2, 0
        while not self._stop:
            pss = i % self.pss_every == 0
            rss = self._sample(pss)
            if pss:
                last_pss, pss_rss = i, rss
            elif (
                rss >= self.near * self.peak_rss and rss > 1.01 * pss_rss and i - last_pss >= 2
            ):  # a new high since the last PSS read
                self._sample(pss=True)
                last_pss, pss_rss = i, rss
            i += 1
            time.sleep(self.every)

    def __enter__(self) -> PeakMemory:
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop = True
        self._t.join()
        self._sample(pss=True)
