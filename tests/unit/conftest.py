"""Hypothesis defaults for the unit suite: no deadline, and no `too_slow` health check.

`make test` runs on 2 cores with `-n 2`, beside the integration suite's processes: a property whose
data takes a loaded second to generate failed the run as "too slow" although no example had
failed (a test that set neither had this happen once; the ones that set both had before).
Properties that set their own `settings` keep theirs.
"""

from hypothesis import HealthCheck, settings

settings.register_profile("lb", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("lb")
