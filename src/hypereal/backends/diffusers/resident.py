"""The one pipeline resident in this process, and runs in a worker thread that a cancelled
request interrupts at the pipeline's next denoising step."""

from __future__ import annotations

import gc
import logging
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from hypereal.backends.base import BackendError

log = logging.getLogger("hypereal.backends.diffusers")

T = TypeVar("T")


class Interrupted(Exception):
    """Raised inside the worker thread once the awaiting task was cancelled."""


@dataclass(frozen=True)
class PipelineKey:
    path: str
    class_name: str
    device: str
    dtype: str
    offload: str


class Resident:
    """The single pipeline loaded in this process.

    Diffusion models take most of a GPU, so two never stay loaded together: loading another
    unloads this one. ``lock`` is held (in the worker thread) for a whole load + generation,
    which also serialises generations on the one device.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.key: PipelineKey | None = None
        self.pipe: Any = None

    def get(self, key: PipelineKey, load: Callable[[], Any]) -> Any:
        """The pipeline for ``key``, loading it (after unloading another). Hold ``lock``."""
        if self.pipe is not None and self.key == key:
            return self.pipe
        self.unload()
        self.pipe = load()
        self.key = key
        return self.pipe

    def unload(self) -> None:
        """Drop the resident pipeline and give its memory back. Hold ``lock``."""
        if self.pipe is None:
            return
        log.info(
            "diffusers: unloading %s from %s",
            self.key.class_name if self.key else "?",
            self.key.path if self.key else "?",
        )
        self.pipe = None
        self.key = None
        # Components reference each other (and accelerate hooks reference them): collect the
        # cycles now so that the CUDA allocator can actually hand the memory back.
        gc.collect()
        torch = torch_if_loaded()
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()


RESIDENT = Resident()


def torch_if_loaded() -> Any:
    """The torch module when something already imported it (never imports it)."""
    return sys.modules.get("torch")


def step_callback(
    interrupt: threading.Event, on_step: Callable[[int], None] | None = None
) -> Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]:
    """A ``callback_on_step_end`` that reports steps and stops the pipeline once cancelled."""

    def callback(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if interrupt.is_set():
            # The pipeline's own flag makes it skip its remaining steps; raising as well skips
            # the VAE decode after them (a minute for a long video) whose result nobody wants.
            pipe._interrupt = True
            raise Interrupted
        if on_step is not None:
            on_step(step + 1)
        return kwargs

    return callback


async def run_interruptible(work: Callable[[], T], interrupt: threading.Event) -> T:
    """Run ``work`` in a worker thread; if the caller is cancelled, set ``interrupt`` and wait
    for the thread to stop before re-raising, so the pipeline is idle when we return."""
    handoff = threading.Lock()
    state = {"started": False, "abandoned": False}
    done = threading.Event()

    def wrapped() -> T:
        with handoff:
            if state["abandoned"]:
                raise Interrupted
            state["started"] = True
        try:
            return work()
        finally:
            done.set()

    try:
        return await anyio.to_thread.run_sync(wrapped, abandon_on_cancel=True)
    except anyio.get_cancelled_exc_class():
        interrupt.set()
        # Either the thread already started (then wait for it: it stops at its next step) or
        # it never will, because `abandoned` is seen under the same lock.
        with handoff:
            state["abandoned"] = True
            started = state["started"]
        if started:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(done.wait)
        raise
    except Interrupted as exc:  # pragma: no cover - only raised after a cancellation
        raise BackendError("generation was interrupted") from exc


# --------------------------------------------------------------------------- sizes
