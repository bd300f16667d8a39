"""The worker loop's stream fetched ahead: the first batch is on its way while the engine is
built, and nothing about the stream changes for the loop (order, end, errors)."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from allinone.train.loop import FetchedAhead, _build_ops_as_make_does


def test_the_first_item_is_fetched_before_it_is_asked_for() -> None:
    started = threading.Event()

    def items():
        started.set()
        yield from range(5)

    ahead = FetchedAhead(items())
    assert started.wait(timeout=10), "the fetch begins when the iterator is made"
    assert list(ahead) == [0, 1, 2, 3, 4]


def test_an_empty_stream_ends_and_a_failing_one_raises_where_it_is_read() -> None:
    assert list(FetchedAhead(iter(()))) == []

    def broken():
        raise OSError("shard-000003.tar: truncated")
        yield  # a generator

    ahead = FetchedAhead(broken())
    with pytest.raises(OSError, match="shard-000003.tar: truncated"):
        next(iter(ahead))


def test_the_worker_builds_ops_with_its_venvs_ninja_into_its_venvs_cache(monkeypatch) -> None:
    """DeepSpeed's op build runs `ninja` from PATH: the venv's one, as `make` built the op, into
    the extension cache `make` built it in (the venv's own), unless the user named another."""
    here = os.path.dirname(sys.executable)
    assert os.path.exists(os.path.join(here, "ninja")), "deepspeed brings the ninja package"
    assert sys.prefix != sys.base_prefix, "the tests run in the project's virtual environment"
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/bin", "/bin"]))
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    _build_ops_as_make_does()
    _build_ops_as_make_does()  # once only
    assert os.environ["PATH"].split(os.pathsep) == [here, "/usr/bin", "/bin"]
    built = os.path.join(sys.prefix, "torch_extensions")
    assert os.environ["TORCH_EXTENSIONS_DIR"] == built
    assert os.path.isdir(os.path.join(built, "deepspeed_shm_comm")), "make built the op there"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/srv/ops")
    _build_ops_as_make_does()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == "/srv/ops"
