"""RunLogger: every logger starts with only its own handlers."""
import gc

from tinyfusion.logging import RunLogger


def test_new_logger_never_inherits_handlers_of_a_collected_one():
    # id() of a collected, unclosed logger is reused at once by CPython; a name built from it handed the
    # new logger the old handlers (bound to a stream that may be closed by then).
    for _ in range(50):
        RunLogger(None, is_main=True)  # dropped without close()
        gc.collect()
        fresh = RunLogger(None, is_main=True)
        assert len(fresh.log.handlers) == 1, fresh.log.handlers
        fresh.close()
