"""Helpers shared by the retraining benchmarks: machine facts, CPU use of other processes, doc sections.

Each benchmark owns one section of a markdown file, delimited by two HTML comments
that name the script. Rerunning a benchmark replaces its own section and leaves
the rest of the file as it is.
"""

from __future__ import annotations

import logging
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path

# Clock ticks per second of /proc/stat and /proc/self/stat.
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def machine_facts() -> str:
    """Describe the CPU, core count, Python and torch versions and the git commit in one markdown list item."""
    import torch

    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0))
    gpu = "CUDA available" if torch.cuda.is_available() else "no GPU"
    return (f"- Machine: {cores} CPU cores ({model}), {gpu}, Python {platform.python_version()}, "
            f"torch {torch.__version__}. Code at the start of the run: {CODE_AT_START}.")


def code_version() -> str:
    """Describe the git commit of the repository and whether retrain/ or monitor/ had uncommitted changes."""
    import subprocess

    repository = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repository, capture_output=True,
                                text=True, check=True).stdout.strip()
        changes = subprocess.run(["git", "status", "--porcelain", "--", "retrain", "monitor"], cwd=repository,
                                 capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "git commit unknown"
    return f"commit {commit}" + (", with uncommitted changes in retrain/ or monitor/" if changes else "")


def _busy_ticks() -> int:
    """Return the ticks all CPUs spent running tasks since boot: user, nice, system, irq and softirq of /proc/stat.

    Idle, iowait and the time the hypervisor took away (steal) are not counted.
    """
    fields = [int(value) for value in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    return user + nice + system + irq + softirq


def _own_ticks() -> int:
    """Return the user and system ticks of this process, all threads and waited-for children included."""
    text = Path("/proc/self/stat").read_text()
    # The command name in brackets may contain spaces, so split after its closing bracket.
    fields = text[text.rindex(")") + 2:].split()
    # Fields 14 to 17 of proc(5) are utime, stime, cutime and cstime. Index 0 here is field 3.
    return sum(int(value) for value in fields[11:15])


@dataclass
class LoadReading:
    wall_s: float
    own_cpu_s: float
    other_cpu_s: float

    @property
    def other_cores(self) -> float:
        """Mean number of cores other processes kept busy during the reading."""
        return self.other_cpu_s / self.wall_s if self.wall_s > 0 else 0.0

    def describe(self) -> str:
        return (f"{self.other_cpu_s:.0f} CPU-seconds used by other processes over {self.wall_s:.0f} s "
                f"(on average {self.other_cores:.2f} of {len(os.sched_getaffinity(0))} cores)")


class OtherLoad:
    """Measure how much CPU time other processes used between ``start`` and ``read``.

    The count is the machine's busy time from /proc/stat minus this process's own CPU
    time, so it includes kernel work done for this process (a small overcount).
    """

    def __init__(self) -> None:
        self.start()

    def start(self) -> None:
        import time

        self._wall = time.monotonic()
        self._busy = _busy_ticks()
        self._own = _own_ticks()

    def read(self) -> LoadReading:
        import time

        busy = _busy_ticks() - self._busy
        own = _own_ticks() - self._own
        return LoadReading(wall_s=time.monotonic() - self._wall, own_cpu_s=own / CLOCK_TICKS,
                           other_cpu_s=max(busy - own, 0) / CLOCK_TICKS)


def section_markers(name: str) -> tuple[str, str]:
    return f"<!-- begin {name} -->", f"<!-- end {name} -->"


def write_section(path: str | Path, name: str, body: str) -> Path:
    """Replace the section of ``path`` between the markers of ``name`` with ``body``.

    The section is appended when the file has no such markers, and the file is
    created when it does not exist.
    """
    path = Path(path)
    begin, end = section_markers(name)
    block = f"{begin}\n{body.rstrip()}\n{end}"
    old = path.read_text() if path.exists() else ""
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(old):
        new = pattern.sub(lambda _match: block, old, count=1)
    else:
        new = (old.rstrip() + "\n\n" if old.strip() else "") + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)
    return path


def publish(path: str | Path, name: str, body: str) -> Path:
    """Print a benchmark's section, write it into ``path`` with ``write_section`` and log where."""
    print(body)
    out = write_section(path, name, body)
    logging.getLogger("bench").info("wrote the %s section of %s", name, out)
    return out


# Taken when a benchmark imports this module, before it loads driftloop, because the
# repository may change while a long benchmark runs.
CODE_AT_START = code_version()
