"""`mmfusion serve`'s Serve runtime settings: the measured "fast" switches for the local cluster it starts,
and a value the user set wins."""

from __future__ import annotations

from mmfusion.serving.server import FAST_SERVE_ENV, use_fast_serve_env


def test_fast_serve_env_is_set_where_unset_and_a_users_value_wins(monkeypatch):
    for k in FAST_SERVE_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", "1")  # the user's choice
    got = use_fast_serve_env()
    assert got == {**FAST_SERVE_ENV, "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "1"}
    import os

    assert all(os.environ[k] == v for k, v in got.items())
