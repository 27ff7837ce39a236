"""Ctrl-C and SIGTERM during a triplet head's epochs: noted by the handler, acted on between batches.

Python runs a signal handler wherever the main thread is, garbage-collector callbacks included,
and an exception raised there is printed ('Exception ignored in ... _xla_gc_callback') and
dropped. Keras' JAX backend runs such a callback all through training, so a Ctrl-C or SIGTERM
raised as KeyboardInterrupt was at times lost and training went on; raised inside ``fit`` it
would also leave the trainer's state half-synced before the best epoch was saved. Here the
handler only sets a flag: a Keras callback ends ``fit`` after the current batch, the epoch loop
stops there, and what follows (scoring, saving) is the normal end of training. A second signal
does what it did before (KeyboardInterrupt): stop at once, saving nothing.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Which signal asked the epochs to stop; false while none has."""

    def __init__(self) -> None:
        self.signal: str | None = None

    def __bool__(self) -> bool:
        return self.signal is not None

    def callback(self) -> Any:
        """A Keras callback that ends ``fit`` (and its validation pass) after the batch in which a
        stop was asked: Keras checks these flags between batches, outside any compiled step."""
        import keras

        request = self

        class StopAfterBatch(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                if request:
                    self.model.stop_training = True

            def on_test_batch_end(self, batch, logs=None):
                if request:
                    self.model.stop_evaluating = True

        return StopAfterBatch()


@contextlib.contextmanager
def stop_between_batches() -> Iterator[StopRequest]:
    """While inside: SIGINT and SIGTERM, where a Python handler would raise (KeyboardInterrupt),
    only set the yielded request; a second one calls that handler. Handlers can be set only in the
    main thread: elsewhere, and for signals left at the system's default or ignored, nothing changes."""
    request = StopRequest()
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: h for s in SIGNALS if callable(h := signal.getsignal(s))}

    def restore() -> None:
        for s, h in previous.items():
            signal.signal(s, h)

    def note(signum: int, frame) -> None:
        if request:  # the second: what it did before, now
            restore()
            previous[signum](signum, frame)
            return
        request.signal = signal.Signals(signum).name

    for s in previous:
        signal.signal(s, note)
    try:
        yield request
    finally:
        restore()
