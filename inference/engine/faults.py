"""Fault injection: hangs, slow steps, out-of-memory errors, empty outputs and crashes, fired
inside the real engine so that the watchdog, the metrics and the alerts can be tested for real.

A fault is armed from the API (``POST /debug/fault``, only with ``--enable-fault-injection``)
and fired by the engine thread at its next forward pass of the fault's stage. Hangs, slow steps,
OOMs and crashes fire from a forward pre-hook on a decoder layer in the middle of the model, so
a stall report shows the model's own frames and an injected OOM leaves the KV cache half updated,
as a real one does. The engine only reads ``pending`` (a plain attribute) while nothing is armed.
"""

from __future__ import annotations

import faulthandler
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any

FAULTS = ("hang", "slow", "oom", "empty", "crash")
# preprocess: the worker thread that decodes a request's images (hang and slow only); vision:
# the vision tower. Both for vision-language models only.
STAGES = ("preprocess", "vision", "prefill", "decode")


@dataclass(frozen=True)
class Fault:
    kind: str  # one of FAULTS
    stage: str  # one of STAGES; an empty output is always made at prefill
    seconds: float | None = None  # hang: how long (None: until shutdown); slow: delay per step
    steps: int = 1  # slow: how many consecutive steps of the stage are slowed

    def describe(self) -> dict[str, Any]:
        return {
            "fault": self.kind,
            "stage": self.stage,
            "seconds": self.seconds,
            "steps": self.steps,
        }


def middle_layer(model: Any) -> Any:
    """The decoder layer in the middle of the model (the longest ModuleList), or the model."""
    import torch

    longest = None
    for module in model.modules():
        if (
            isinstance(module, torch.nn.ModuleList)
            and len(module)
            and (longest is None or len(module) > len(longest))
        ):
            longest = module
    return longest[len(longest) // 2] if longest is not None else model


class FaultInjector:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._armed: list[Fault] = []
        self._slow_left: dict[int, int] = {}  # id(fault) -> steps still to slow
        self._release = threading.Event()
        self.pending = False  # read by the engine at every step: True while a fault is armed
        self.fired: list[Fault] = []

    # ---- API side ----------------------------------------------------------------------------

    def arm(self, fault: Fault) -> None:
        with self._lock:
            self._armed.append(fault)
            self.pending = True

    def armed(self) -> list[Fault]:
        with self._lock:
            return list(self._armed)

    def release(self) -> None:
        """End every injected hang and slow step now (the server is stopping)."""
        self._release.set()

    # ---- engine side -------------------------------------------------------------------------

    def take(self, stage: str) -> Fault | None:
        """The fault to fire at this step of ``stage``, if one is armed for it."""
        with self._lock:
            for fault in self._armed:
                fires_here = fault.stage == stage or (fault.kind == "empty" and stage == "prefill")
                if not fires_here:
                    continue
                if fault.kind == "slow":
                    left = self._slow_left.setdefault(id(fault), fault.steps) - 1
                    self._slow_left[id(fault)] = left
                    if left <= 0:
                        self._remove(fault)
                else:
                    self._remove(fault)
                self.fired.append(fault)
                return fault
        return None

    def _remove(self, fault: Fault) -> None:
        self._armed.remove(fault)
        self._slow_left.pop(id(fault), None)
        self.pending = bool(self._armed)

    def fire(self, fault: Fault) -> None:
        """Run a fault in the engine thread (from inside the model's forward pass)."""
        if fault.kind == "hang":
            self._release.wait(fault.seconds)
        elif fault.kind == "slow":
            self._release.wait(fault.seconds or 0)
        elif fault.kind == "oom":
            import torch

            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 20.00 GiB (injected by /debug/fault at "
                f"{fault.stage})"
            )
        elif fault.kind == "crash":
            # A real segmentation fault of this thread, as a driver or kernel bug gives: the
            # fault handler writes every thread's Python stack to stderr, then the process dies.
            if not faulthandler.is_enabled():
                faulthandler.enable(file=sys.stderr, all_threads=True)
            signal.pthread_kill(threading.get_ident(), signal.SIGSEGV)
