"""Fixtures for the VM tests: a guard against unhandled errors, and (for real-qemu tests) the guest."""

import gc

import pytest
from twisted.logger import globalLogPublisher


@pytest.fixture(autouse=True)
def no_unhandled_errors():
    """Fail a test that let a Deferred error go unhandled or logged a failure (as magic-wormhole does)."""
    errors = []

    def observer(event):
        if event.get("isError") or event.get("log_failure") is not None:
            errors.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        yield
        gc.collect()
    finally:
        globalLogPublisher.removeObserver(observer)
    if errors:
        from twisted.logger import formatEvent

        pytest.fail("unhandled errors were logged:\n" + "\n".join(
            formatEvent(e) + ("\n" + e["log_failure"].getTraceback() if e.get("log_failure") else "")
            for e in errors))
