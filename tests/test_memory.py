"""The report's peak covers the whole process, although each stage resets the kernel's peak."""
import sys

import pytest
import torch

from sparsellm import memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM reset is Linux-only")
def test_process_peak_survives_the_per_stage_resets():
    memory.reset_peak()
    x = torch.ones(96 * 2**20)  # 384 MiB, touched
    high = memory.peak_rss_bytes()
    del x
    memory.release_freed()
    memory.reset_peak()  # a stage begins: its own peak starts from what is resident now
    assert memory.peak_rss_bytes() < high - 300 * 2**20
    assert memory.process_peak_bytes() >= high - 2**20  # the kernel updates its high-water mark lazily (pages)
