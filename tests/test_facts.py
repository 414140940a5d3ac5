"""One owner per fact: the env-id format, whether a pid is alive, where a venv's site-packages is,
how bytes and durations are shown, and the names of environment variables. Each owner's contract,
and checks that no other module writes the fact again."""

from __future__ import annotations

import pytest

from uvkerneld import envid, protocol
from uvkerneld.ctl import target_args


# --- env id (envid.py) -------------------------------------------------------------------------


def test_env_id_format_and_parse_round_trip() -> None:
    for number in (0, 1, 0xA00000000000, 16 ** 12 - 1):
        text = envid.format_env_id(number)
        assert len(text) == 14 and text.startswith("e-")
        assert envid.is_env_id(text) and envid.parse_env_id(text) == number
    assert envid.format_env_id(0) == "e-000000000000" and envid.format_env_id(0xAB) == "e-0000000000ab"
    assert envid.is_env_id(envid.EXAMPLE)
    fresh = {envid.new_env_id() for _ in range(100)}
    assert len(fresh) == 100 and all(envid.is_env_id(text) for text in fresh)


@pytest.mark.parametrize("text", [
    "", "e-", "e-0123456789a", "e-0123456789abc", "E-0123456789ab", "e-0123456789AB", "e-0123456789ag",
    "x-0123456789ab", "e_0123456789ab", "../etc/passwd", " e-0123456789ab", "e-0123456789ab\n",
    "e-+123456789ab", "e- 123456789ab", "e-0x23456789ab", None, 12, ["e-0123456789ab"],
])
def test_env_id_rejects(text: object) -> None:
    assert not envid.is_env_id(text)
    with pytest.raises(ValueError, match="an env id looks like e-0123456789ab"):
        envid.parse_env_id(text)


@pytest.mark.parametrize("number", [-1, 16 ** 12])
def test_env_id_format_rejects_numbers_out_of_range(number: int) -> None:
    with pytest.raises(ValueError, match="from 0 to"):
        envid.format_env_id(number)


def test_env_id_users_agree_with_the_owner() -> None:
    # The wire validator and uvkernelctl's target parsing decide by the same rule.
    for text in ("e-0123456789ab", "e-0123456789AB", "e-0123456789a"):
        wire_ok = True
        try:
            protocol.parse_request(protocol.request(1, "remove", {"env_id": text}))
        except protocol.BadRequest:
            wire_ok = False
        assert wire_ok == envid.is_env_id(text) == ("env_id" in target_args(text)), text
