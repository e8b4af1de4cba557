"""Session-scoped pytest fixtures for the Flink / Prism smoke tests.

Import them into a test module::

    from tools.flink.pytest_fixtures import flink_env, prism_env  # noqa: F401

``flink_env`` starts one standalone Flink cluster (JobManager + TaskManager)
and one Beam worker pool for the whole test session and stops both at the end;
it skips (naming the fetch command) only when the fetched artefacts are absent.
"""
from __future__ import annotations

import dataclasses

import pytest

from tools.flink import cluster as fc


@dataclasses.dataclass
class RunnerEnv:
    name: str
    args: list[str]
    cluster: "fc.FlinkCluster | None" = None
    pool: "fc.WorkerPool | None" = None


@pytest.fixture(scope="session")
def flink_env():
    missing = fc.missing_flink_artifacts()
    if missing:
        pytest.skip(f"Flink artefacts absent ({'; '.join(missing)}). Fetch them with: {fc.FETCH_HINT}")
    with fc.flink_cluster() as cluster, fc.worker_pool() as pool:
        print(f"\n[flink_env] Flink {cluster.flink_version} cluster at {cluster.rest_url} "
              f"ready in {cluster.start_seconds:.1f}s; worker pool at {pool.address}")
        yield RunnerEnv("flink", fc.flink_pipeline_args(cluster, pool), cluster=cluster, pool=pool)


@pytest.fixture(scope="session")
def prism_env():
    binary = fc.prism_binary()
    if not binary:
        pytest.skip(f"prism binary absent (looked for $PRISM_BINARY and {fc.PRISM_DIR}/bin/prism). "
                    "Build it with: make runners-fetch")
    yield RunnerEnv("prism", fc.prism_pipeline_args(binary))
