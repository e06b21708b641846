"""Fault injection for the crash and interrupt tests.

With SPARSELLM_TEST_KILL_AT=<point> the process sends itself SPARSELLM_TEST_SIGNAL (KILL by default,
INT for a Ctrl-C) when it reaches that point, so a test can stop a real process at a chosen place
instead of racing a timer. Points: "stats:<layer>" (the calibration statistics of a decoder layer are
collected, nothing compressed yet), "save:<layer>" (a layer's checkpoint files are written but not yet
committed), "layer:<layer>" (a layer is compressed and checkpointed), "reconstruct:<layer>" (a block is
reconstructed, not yet checkpointed), "export" (every output file is written to the temp folder, not
yet renamed into place). Unset, this costs one dict lookup."""
from __future__ import annotations

import os
import signal


def fault_point(name: str) -> None:
    if os.environ.get("SPARSELLM_TEST_KILL_AT") == name:
        os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("SPARSELLM_TEST_SIGNAL", "KILL")))
