"""Review of issue 11 (the sync op): a declaration a hand-written client sends within the 1 MiB frame
limit must not stall the daemon's event loop (every user's kernel start goes through it) nor end in an
internal error. Each test fails on 0920afc."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from helpers import Daemon, Layout

from uvkerneld import client, protocol

BOUND_S = 1.0  # far above what a loop callback may take; the old code took 5-15 s here


@pytest.mark.slow
def test_bug_a_sync_with_thousands_of_dependencies_does_not_hold_the_loop(
        bare_daemon: Daemon, layout: Layout) -> None:
    key = {"kind": "notebook", "value": str(layout.notebook("many.ipynb"))}
    acquired = layout.request("acquire", {"key": key}, timeout=300)
    names = ["p%d>=1" % number for number in range(30000)]
    script = "# /// script\n# dependencies = [\n%s# ]\n# ///\n" % "".join('#   "%s",\n' % n for n in names)
    # The two places disagree on the last name only: refused after every requirement was parsed,
    # before uv runs (nothing is fetched).
    declaration = {"script": script, "script_cell": 1, "uv": {"dependencies": [*names[:-1], "zz"]},
                   "uv_key": "metadata.runt.uv"}
    outcome: dict[str, Any] = {}

    def send() -> None:
        try:
            layout.request("sync", {"key": acquired["key"], "declaration": declaration}, timeout=120)
        except protocol.UvkError as exc:
            outcome["error"] = exc

    sender = threading.Thread(target=send)
    sender.start()
    slowest = 0.0
    while sender.is_alive():  # another user's requests meanwhile: what a kernel start waits for
        started = time.monotonic()
        layout.request("status", timeout=130)
        slowest = max(slowest, time.monotonic() - started)
    sender.join(timeout=130)
    assert isinstance(outcome.get("error"), protocol.BadDeclaration), outcome
    assert slowest < BOUND_S, "a status request waited %.1f s behind one user's sync" % slowest


def test_bug_a_deeply_nested_pep723_block_is_a_bad_declaration_not_an_internal_error(
        bare_daemon: Daemon, layout: Layout) -> None:
    key = {"kind": "notebook", "value": str(layout.notebook("deep.ipynb"))}
    script = "# /// script\n# dependencies = []\n# x = %s%s\n# ///\n" % ("[" * 3000, "]" * 3000)
    with pytest.raises(protocol.UvkError) as caught:
        client.request(str(layout.socket), "sync", {
            "key": key, "declaration": {"script": script, "script_cell": 1}}, 300)
    # Today: RecursionError in tomllib -> "internal error in uvkerneld" and a traceback in the log.
    assert isinstance(caught.value, protocol.BadDeclaration), caught.value
    assert "cell 1 (PEP 723 block)" in caught.value.message
    assert "internal error" not in bare_daemon.log
