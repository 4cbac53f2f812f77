"""pytest plugin: under CI=true a skipped test fails, naming what should have provided it.

A skip in CI means a set-up step did not run (SLURM, the offline SmolLM2 model, an optional
package): the suite would look green while testing less. Locally skips stay skips.
"""
import os

import pytest

SETUP_HINT = ("CI must run every test: the set-up that provides it (tools/setup_env.sh for Python packages and "
              "offline models, tools/slurm_cluster.sh for SLURM) did not")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and in_ci() and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true ({reason.removeprefix('Skipped: ')}); {SETUP_HINT}"
