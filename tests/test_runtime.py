"""The embedded local Ray's worker set-up: Ray Train's placement-group cleaner polls the state API, which a
Ray without a dashboard does not serve; the set-up hook drops that one warning and nothing else."""
import logging

from pipeline.runtime import quiet_state_api_pollers

CLEANER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
UNAVAILABLE = ("Failed to query Ray Train Controller actor state. "
               "State API may be temporarily unavailable. Continuing to monitor.")


def _passes(message: str) -> bool:
    record = logging.LogRecord(CLEANER, logging.WARNING, __file__, 1, message, None, None)
    return bool(logging.getLogger(CLEANER).filter(record))


def test_only_the_state_api_warning_is_dropped():
    assert _passes(UNAVAILABLE)
    quiet_state_api_pollers()
    assert not _passes(UNAVAILABLE)
    assert _passes("Failed to clean up placement group: timed out")
    assert _passes("Detected that the Ray Train controller actor (abc) is dead. Cleaning up placement group")
