"""``JobRunner``: one model job at a time, off the notebook's thread, with a progress line, Cancel, and errors shown
as messages (never as a traceback in the notebook).

A job is ``work() -> result``. ``deliver(result)`` hands the result to the app; it still runs inside the job, so a
failure there is shown like one in ``work``. Once the job has succeeded and the controls are released, ``then()``
runs (default: the runner's ``on_idle``); it may start the next job. While a job runs, a forward pre-hook on the
model counts its forward passes for the progress line and every block's forward pre-hook is a cancel point; inside
:func:`lensbench.engine.cancel_scope` every engine primitive also stops at its next batch or step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import ipywidgets as W

from lensbench.engine import Cancelled as EngineCancelled
from lensbench.engine import cancel_scope

from ._chrome import error_html, progress_html, status_html

__all__ = ["Cancelled", "JobRunner", "BUSY"]

#: The message shown when a job is refused because another one runs.
BUSY = "busy: wait for the running job or press Cancel."


class Cancelled(Exception):  # noqa: N818 - reads naturally: "raise Cancelled"
    """Raised inside a job (at the next model forward) after **Cancel** was pressed."""


class JobRunner:
    """Runs jobs one at a time and reports them in a progress bar, a progress line and a message area.

    Args:
        progress: the bar (``bar_style`` ends ``"success"``, ``"warning"`` for cancelled, ``"danger"`` for failed).
        label: the progress line (``label · N forward passes · t s``, then ``label: outcome · ...``).
        message: where outcomes and errors are shown.
        cancel_button: enabled only while a job runs; locked: buttons disabled while a job runs.
        model: ``model() -> LensModel | None``: the model whose forward passes are counted and cancelled.
        background: run jobs in a worker thread (default); ``False`` runs them in the caller.
        on_idle: called after a successful job that has no ``then``.
        thread_name: the worker thread's name.

    Attributes:
        last_error: the exception behind the last error message (for debugging), or None.
    """

    def __init__(self, *, progress: W.IntProgress, label: W.HTML, message: W.HTML, cancel_button: W.Button,
                 locked: Sequence[W.Button] = (), model: Callable[[], Any] = lambda: None, background: bool = True,
                 on_idle: Callable[[], Any] | None = None, thread_name: str = "lb-job"):
        self.progress, self.label, self.message = progress, label, message
        self.cancel_button, self.locked = cancel_button, tuple(locked)
        self.model, self.background, self.on_idle, self.thread_name = model, background, on_idle, thread_name
        self.last_error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._worker: threading.Thread | None = None
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._hooks: list = []
        self._job_label, self._passes, self._t0, self._last_ui = "", 0, 0.0, 0.0

    # ------------------------------------------------------------------ state
    @property
    def busy(self) -> bool:
        """True while a background job runs (a job's own follow-up, started from its thread, is allowed)."""
        t = self._thread
        return t is not None and t.is_alive() and t is not threading.current_thread()

    @property
    def hooks(self) -> list:
        """The hook handles installed on the model for the running job (empty between jobs)."""
        return list(self._hooks)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the current job (and any follow-up it started) ends; True if nothing is running any more."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (t := self._thread) is not None and t is not threading.current_thread():
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if t.is_alive():  # timed out
                return False
            if self._thread is t:  # no follow-up job was started
                break
        return not self.busy

    # ------------------------------------------------------------------ messages
    def show_error(self, error: BaseException | str) -> None:
        """Show ``error`` in the message area (see :func:`error_html`) and keep the exception as ``last_error``."""
        self.last_error = error if isinstance(error, BaseException) else None
        self.message.value = error_html(error)

    def refuse_busy(self) -> bool:
        """Say that a job is running; returns False (the refused action did not start)."""
        self.message.value = status_html(BUSY, "busy")
        return False

    # ------------------------------------------------------------------ jobs
    def cancel(self) -> None:
        """Stop the running job at the model's next forward pass (or the engine's next batch or step)."""
        if self.busy:
            self._cancel.set()
            self.label.value = status_html("cancelling…", "note")

    def check_cancel(self) -> None:
        """Raise :class:`Cancelled` in the job's thread once Cancel was pressed (a no-op on other threads)."""
        if self._cancel.is_set() and threading.current_thread() is self._worker:
            raise Cancelled

    def start(self, label: str, work: Callable[[], Any], deliver: Callable[[Any], Any] | None = None,
              then: Callable[[], Any] | None = None) -> bool:
        """Run ``work`` as a job named ``label``; False (with a message) if another job is running."""
        with self._lock:
            if self.busy:
                return self.refuse_busy()
            self._cancel.clear()
            self._job_label, self._passes, self._t0, self._last_ui = label, 0, time.perf_counter(), 0.0
            self.progress.max, self.progress.value, self.progress.bar_style = 1, 0, "info"
            self.label.value = progress_html(label)
            for b in self.locked:
                b.disabled = True
            self.cancel_button.disabled = False
            if self.background:
                self._thread = threading.Thread(target=self._run, args=(work, deliver, then), daemon=True,
                                                name=self.thread_name)
                self._worker = self._thread
                self._thread.start()
                return True
        self._worker = threading.current_thread()
        self._run(work, deliver, then)
        return True

    def _run(self, work, deliver, then) -> None:
        outcome, style = "done", "success"
        self._install_hooks()
        try:
            with cancel_scope(self._cancel):
                result = work()
                self.check_cancel()
                if deliver is not None:
                    deliver(result)
        except (Cancelled, EngineCancelled):
            outcome, style = "cancelled", "warning"
            self.message.value = status_html(
                f"{self._job_label}: cancelled (press Run or revisit the tab to redo it).", "cancelled")
        except Exception as e:  # noqa: BLE001 - shown in the app, never as a kernel traceback
            outcome, style = "failed", "danger"
            self.show_error(e)
        finally:
            self._remove_hooks()
            self.progress.value, self.progress.bar_style = 1, style
            self.label.value = progress_html(self._job_label, outcome=outcome, passes=self._passes,
                                             seconds=time.perf_counter() - self._t0)
            for b in self.locked:
                b.disabled = False
            self.cancel_button.disabled = True
            self._worker = None
        if outcome == "done":
            follow = then if then is not None else self.on_idle
            if follow is not None:
                follow()

    # ------------------------------------------------------------------ model hooks
    def _on_block(self, *_args) -> None:
        if threading.current_thread() is self._worker:
            self.check_cancel()

    def _on_model(self, *_args) -> None:
        if threading.current_thread() is not self._worker:
            return
        self.check_cancel()
        self._passes += 1
        now = time.perf_counter()
        if now - self._last_ui > 0.25:
            self._last_ui = now
            self.label.value = progress_html(self._job_label, passes=self._passes, seconds=now - self._t0)

    def _install_hooks(self) -> None:
        m = self.model()
        if m is None:
            return
        self._hooks.append(m.model.register_forward_pre_hook(self._on_model))
        for blk in m.blocks:
            self._hooks.append(blk.register_forward_pre_hook(self._on_block))

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
