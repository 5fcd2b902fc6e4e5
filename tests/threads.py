"""A test helper: keep a context open in another thread while the test's own thread runs."""
import contextlib
import threading


@contextlib.contextmanager
def entered_in_another_thread(enter, then=lambda value: value):
    """Enter `enter()` in a new thread and hold it there while the body runs; the body gets
    `then(value)`, computed in that thread (what the other thread sees)."""
    inside, done, seen = threading.Event(), threading.Event(), {}

    def other_thread():
        with enter() as value:
            seen["value"] = then(value)
            inside.set()
            done.wait(10)
    t = threading.Thread(target=other_thread)
    t.start()
    inside.wait(10)
    try:
        yield seen["value"]
    finally:
        done.set()
        t.join()
