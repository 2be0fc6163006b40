"""tmlib.allocator.keep_freed_blocks: the forwards' large blocks are reused, not faulted in anew."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Eleven no_grad forwards of SimpleConv on 250 images (its convolutions' outputs: 25 MB each); the
# page faults of the last ten counted (the first one maps the memory either way).
PROGRAM = """
import json, resource, sys
import torch
from tmlib import models
from tmlib.allocator import keep_freed_blocks
kept = keep_freed_blocks() if sys.argv[1] == "keep" else None
torch.manual_seed(0)
model, x = models.SimpleConv().eval(), torch.randn(250, 1, 28, 28)
with torch.no_grad():
    model(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        model(x)
print(json.dumps({"kept": kept, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _faults(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}  # make's settings off
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", PROGRAM, mode], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    default, kept = _faults("default"), _faults("keep")
    block = 250 * 32 * 28 * 28 * 4 // 4096  # pages of one convolution's output
    # glibc unmaps freed blocks: the forwards fault blocks in anew (measured 49k over four forwards
    # on one machine, 290k over ten on another)
    assert default["faults"] > 10 * block
    assert kept["kept"] is True
    # the heap's blocks are reused: a few blocks' worth of faults over the ten forwards, however
    # many forwards (the threads' own arenas still fault a little at first; measured 0–4 blocks,
    # 0–24.5k, against 29–66 blocks for the default on the same machine)
    assert kept["faults"] < 6 * block
    assert kept["faults"] * 5 < default["faults"]


def test_without_glibc_nothing_changes(monkeypatch):
    from tmlib import allocator

    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    assert allocator.keep_freed_blocks() is False
