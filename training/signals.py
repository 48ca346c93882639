"""Stopping on a signal: SIGTERM/SIGINT save a checkpoint after the current step, and the run exits 0."""

from __future__ import annotations

import os
import signal


class StopFlag:
    """SIGTERM/SIGINT ask the loop to save and stop at the next step boundary. After that a SIGINT (a second
    Ctrl-C) kills at once, the default action, so a hung step or collective never needs kill -9. Further
    SIGTERMs are still caught: DeepSpeed's launcher SIGTERMs every rank on top of the signal the ranks got
    themselves (Ctrl-C, a scheduler's SIGTERM to the whole job), and that must not cost the checkpoint."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, announce: bool = False):
        self.signum = 0
        self.announce = announce
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        first, self.signum = not self.signum, signum
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if self.announce and first:  # os.write: print() may be mid-call in the interrupted frame
            os.write(2, f"training: {signal.Signals(signum).name}: saving a checkpoint after this step; "
                        "Ctrl-C (SIGINT) again stops at once without it\n".encode())
