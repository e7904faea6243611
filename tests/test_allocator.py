"""A CPU run hands freed tensors back to the system (fulltune.launch.return_freed_memory), as users
measure memory: no allocator environment variables needed."""

from __future__ import annotations

import os
import subprocess
import sys

from .conftest import REPO

# 3 rounds of 400 one-MiB tensors, each beside a tiny long-lived one (as a training step's big
# transients sit beside small tensors that outlive them), then everything big freed: RSS growth in MiB
SCRIPT = """
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from fulltune.launch import return_freed_memory

def rss():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024

if sys.argv[1] == "set":
    assert return_freed_memory(OmegaConf.create({"accelerator": "cpu"}))
base, keep = rss(), []
for _ in range(3):
    big = []
    for _ in range(400):
        big.append(torch.ones(256 * 1024))
        keep.append(torch.ones(16))
    del big
print(round(rss() - base))
"""


def _growth_mib(mode: str) -> int:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode], env=env, capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


def test_freed_tensors_leave_the_process_on_cpu():
    assert _growth_mib("set") < 40  # the 400 MiB went back to the system
    assert _growth_mib("default") > 200  # glibc's default keeps them in a heap the small tensors pin

