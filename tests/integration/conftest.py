"""Fixtures shared by integration modules that start their own ``server`` fixture."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import tritonclient.grpc.aio as aioclient

from tests.server_harness import ServerThread


@pytest.fixture
async def aio(server: ServerThread) -> AsyncIterator[aioclient.InferenceServerClient]:
    """An asyncio tritonclient on the requesting module's ``server``."""
    client = aioclient.InferenceServerClient(server.url)
    try:
        yield client
    finally:
        await client.close()
