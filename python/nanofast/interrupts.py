"""Ctrl-C and SIGTERM during a training run: deferred to safe points, so a checkpoint never sees a
half-updated model."""
import signal
import threading
import time


class Interrupts:
    """Ctrl-C and SIGTERM.

    During the training loop (`deferring`), the first signal only records the request; the loop calls
    check() at safe points (each iteration's start, each micro-step, each evaluation batch), which
    raises KeyboardInterrupt there. So a checkpoint never sees a half-updated model, and the request
    cannot get lost (Python drops an exception raised by a signal handler that happens to run inside a
    weakref callback or __del__). A second signal more than 2 seconds after the first raises at once
    (one sooner is taken for the same request delivered twice, as torchrun forwards the terminal's
    Ctrl-C to workers that got it already); so does any signal during setup.
    """

    def __init__(self):
        self.deferring = False
        self.requested = None
        self.requested_at = 0.0
        self.in_step = False  # inside the optimizer step: the model may be half-updated
        self._old = {}

    def _handler(self, signum, frame):
        if self.deferring:
            if self.requested is None:
                self.requested, self.requested_at = signum, time.monotonic()
                return
            if time.monotonic() - self.requested_at < 2.0:
                return
        raise KeyboardInterrupt

    def check(self):
        if self.requested is not None:
            raise KeyboardInterrupt

    def install(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except (ValueError, OSError):
                pass
        return self

    def uninstall(self):
        for sig, old in self._old.items():
            try:
                signal.signal(sig, old)
            except (ValueError, OSError):
                pass
        self._old = {}
