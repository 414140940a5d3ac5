"""Which envs have a live kernel (uvkerneld/lifelines.py), on a real store and real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from uvkerneld import states
from uvkerneld.lifelines import Lifelines
from uvkerneld.protocol import EnvKey
from uvkerneld.store import Store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """A real store holding the envs the tests name (kernels belong to envs that exist)."""
    opened = Store(tmp_path / "state.db")
    for number in (1, 2, 3):
        env_id = "e-%012x" % number
        (tmp_path / env_id).mkdir()
        opened.insert_creating(env_id, tmp_path / env_id, "spec", sys.executable, owner_uid=os.getuid(),
                               key=EnvKey("env", "env-%d" % number))
        opened.transition(env_id, states.ASSIGNED)
    yield opened
    opened.close()


def reaped_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(60)
    return child.pid


def test_an_env_is_live_while_any_of_its_lifelines_is_open(store: Store) -> None:
    lifelines = Lifelines(store)
    lifelines.add("e-000000000001", connection_id=1, pid=os.getpid())
    lifelines.add("e-000000000001", connection_id=2, pid=os.getpid())
    assert lifelines.live_env_ids() == {"e-000000000001"}
    lifelines.remove("e-000000000001", connection_id=1, pid=os.getpid(), kernel_ended=True)
    assert lifelines.live_env_ids() == {"e-000000000001"}
    lifelines.remove("e-000000000001", connection_id=2, pid=os.getpid(), kernel_ended=True)
    assert lifelines.live_env_ids() == set()
    assert store.kernels() == []


def test_a_kernel_outlives_a_stopping_daemon_and_the_next_one_knows_it(store: Store) -> None:
    lifelines = Lifelines(store)
    lifelines.add("e-000000000002", connection_id=1, pid=os.getpid())
    lifelines.remove("e-000000000002", connection_id=1, pid=os.getpid(), kernel_ended=False)  # shutting down
    successor = Lifelines(store)
    successor.forget_dead_kernels()
    assert successor.live_env_ids() == {"e-000000000002"}  # its process still runs


def test_kernels_of_an_earlier_daemon_that_have_exited_are_forgotten(store: Store) -> None:
    store.add_kernel("e-000000000003", reaped_pid())
    lifelines = Lifelines(store)
    assert lifelines.live_env_ids() == set()  # an exited kernel never counts
    lifelines.forget_dead_kernels()
    assert store.kernels() == []
