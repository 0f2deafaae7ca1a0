"""A real MLflow server process (SQLite backend, local proxied artifacts) on a free loopback port."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pe_triage.registry.server import local_server


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with local_server(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri
