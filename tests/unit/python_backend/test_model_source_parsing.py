"""Reading model.py for auto_complete_config while other models load on other threads."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.backends.python import factory
from tests.concurrency import on_threads

MODEL = '''\
class TritonPythonModel:
    @staticmethod
    def auto_complete_config(config):
        return config

    def execute(self, requests):
        return [None for _ in requests]
'''


class Finalized:
    """Cyclic garbage whose finalizer runs Python code: a collection in the middle of a
    parse runs it, and the interpreter may then switch threads there."""

    def __init__(self) -> None:
        self.me = self

    def __del__(self) -> None:
        sum(range(50))


@pytest.fixture
def eager_switching() -> Iterator[None]:
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


@pytest.mark.usefixtures("eager_switching")
def test_models_read_on_several_threads_at_once_all_parse(tmp_path: Path) -> None:
    """CPython 3.11 shares the AST constructor's recursion depth between threads: without
    the parser's lock, two parses interleaved by a collection fail with SystemError."""
    path = tmp_path / "model.py"
    path.write_text(MODEL * 20)
    answers: list[bool] = []
    failures: list[BaseException] = []

    def read() -> None:
        for _ in range(100):
            for _ in range(50):
                Finalized()
            try:
                answers.append(factory._defines_auto_complete(path))
            except Exception as exc:
                failures.append(exc)

    on_threads(read)
    assert failures == []
    assert answers == [True] * 400
