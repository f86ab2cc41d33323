"""The container tier: skipped, with the reason, where no Docker engine or image is at hand."""

from __future__ import annotations

import pytest

from symfo_failover.harness._containers import container_available, default_image


@pytest.fixture(scope="session")
def container_image() -> str:
    """The image to run (``$SYMFO_CONTAINER_IMAGE``, else ``postgres:15``), or skip."""
    ok, reason = container_available()
    if not ok:
        pytest.skip(f"container tier: {reason}")
    return default_image()
