"""Huge pages for MLX's buffers: when a process runs itself again to ask for them."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

from exo.common.hugepages import THP_SETTING, TUNABLE, env_with_huge_pages

MADVISE = "always [madvise] never\n"


def test_asked_for_only_where_the_kernel_gives_them_on_request() -> None:
    glibc = ("glibc", "2.36")
    assert env_with_huge_pages({}, MADVISE, glibc) == {"GLIBC_TUNABLES": TUNABLE}
    assert env_with_huge_pages({}, "[always] madvise never", glibc) is None
    assert env_with_huge_pages({}, "always madvise [never]", glibc) is None
    assert env_with_huge_pages({}, MADVISE, ("glibc", "2.31")) is None  # no such tunable
    assert env_with_huge_pages({}, MADVISE, ("", "")) is None  # musl
    assert env_with_huge_pages({"EXO_HUGEPAGES": "0"}, MADVISE, glibc) is None
    done = {"GLIBC_TUNABLES": TUNABLE}
    assert env_with_huge_pages(done, MADVISE, glibc) is None  # no second run
    other = env_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, MADVISE, glibc)
    assert other == {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{TUNABLE}"}


def test_a_process_runs_itself_again_once_with_huge_pages_asked_for(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(
        "import os\n"
        "from exo.common import hugepages\n"
        "print('start', os.getpid(), flush=True)\n"
        "hugepages.ensure()\n"
        "print('env', os.environ.get('GLIBC_TUNABLES'), os.getpid())\n"
    )
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    try:
        thp = Path(THP_SETTING).read_text()
    except OSError:
        thp = ""
    linux = sys.platform == "linux"
    want = env_with_huge_pages(os.environ, thp, platform.libc_ver()) if linux else None
    starts = [line for line in out if line.startswith("start")]
    env, pid = out[len(starts)].split()[1:]
    if want is None:
        assert len(starts) == 1 and env == str(os.environ.get("GLIBC_TUNABLES"))
    else:  # twice started, same pid, the tunable set the second time
        assert len(starts) == 2 and env == want["GLIBC_TUNABLES"]
        assert starts[0].split()[1] == starts[1].split()[1] == pid
