"""The test modules' local Ray instances, on loopback."""

import contextlib
import logging
import os
import time

logger = logging.getLogger(__name__)

# Ray waits a fixed 30 s for a new raylet to register with its GCS. On 2 busy cores,
# right after the previous module's instance shut down, that wait can run out though
# nothing is wrong; the instance is the tests' scaffolding, so one more start is tried.
STARTUP_TRIES = 2


@contextlib.contextmanager
def local_ray(num_cpus: int, env: dict[str, str] | None = None, **init_kwargs):
    """A local Ray instance with `num_cpus` logical CPUs for the `with` block.

    `env` is set in this process before the raylet starts (Ray's own processes read
    their settings from it) and removed afterwards.
    """
    import ray

    env = env or {}
    os.environ.update(env)
    try:
        for attempt in range(1, STARTUP_TRIES + 1):
            try:
                ray.init(
                    address="local",
                    num_cpus=num_cpus,
                    include_dashboard=False,
                    log_to_driver=False,
                    **init_kwargs,
                )
                break
            except Exception as e:
                if "timed out during startup" not in str(e) or attempt == STARTUP_TRIES:
                    raise
                logger.warning("Ray start %d timed out; starting again: %s", attempt, e)
                ray.shutdown()
                time.sleep(2.0)
        yield ray
    finally:
        ray.shutdown()
        for key in env:
            os.environ.pop(key, None)
