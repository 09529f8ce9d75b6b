"""`vmtrace sql` keeps its Parquet export only where no other local user can plant one.

When the session directory is not writable the export used to go to
``/tmp/vmtrace-sql-<hash of the path>``: a name anyone could create first, with Parquet
files of their own that the query would then answer from.
"""
from __future__ import annotations

import hashlib
import os

import pytest

import pseudosession as ps
from vmtrace.commands import sql


@pytest.fixture()
def readonly_session(tmp_path, monkeypatch):
    d = ps.make_pseudo_session(tmp_path / "sess", n_probes=5)
    real = os.access
    # root may write anywhere, so "not writable" is simulated for the session only
    monkeypatch.setattr(sql.os, "access", lambda p, m: False if os.fspath(p) == str(d) else real(p, m))
    return str(d)


def test_export_never_goes_to_a_predictable_tmp_name(readonly_session, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    key = hashlib.sha1(os.path.abspath(readonly_session).encode()).hexdigest()[:16]
    planted = os.path.join("/tmp", "vmtrace-sql-" + key)
    target = sql.parquet_for(readonly_session)
    assert not target.startswith(planted)
    assert target.startswith(str(tmp_path / "cache" / "vmtrace"))
    st = os.stat(tmp_path / "cache" / "vmtrace")
    assert st.st_mode & 0o777 == 0o700 and st.st_uid == os.geteuid()


@pytest.mark.parametrize("how", ["other-owner", "group-writable", "symlink"])
def test_a_cache_that_is_not_ours_and_private_is_not_used(how, readonly_session, tmp_path,
                                                          monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    if how == "symlink":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        os.symlink(tmp_path / "elsewhere", cache / "vmtrace")
    else:
        (cache / "vmtrace").mkdir(mode=0o700)
        if how == "other-owner":
            os.chown(cache / "vmtrace", 65534, 65534)
        else:
            os.chmod(cache / "vmtrace", 0o770)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    assert sql.private_cache_dir() is None
    target = sql.parquet_for(readonly_session)
    assert not target.startswith(str(cache)) and not target.startswith(str(tmp_path / "elsewhere"))
    st = os.stat(os.path.dirname(target))
    assert st.st_uid == os.geteuid() and not st.st_mode & 0o077   # inside a fresh mkdtemp
