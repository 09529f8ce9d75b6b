"""The recorder's bounds one at a time, in process: the control link's bytes and time,
every guest-value checker, meta.json into the trace.dat, and session.json read back.

The same bounds met by a real recorder and a hostile agent are in test_hostile_guest.py;
here each is pinned where it is enforced, so a failure says which one broke.
"""
from __future__ import annotations

import fcntl
import json
import os
import threading
import time
import zlib
from pathlib import Path

import pytest

from paths import DATA
from vmtrace import protocol as P
from vmtrace.errors import VmtraceError
from vmtrace.host import control, guestdata
from vmtrace.host.control import AgentLink, Request

MIB = 1 << 20


def _pipes():
    """(link, agent_read_fd, agent_write_fd) over two real pipes."""
    h2a_r, h2a_w = os.pipe()
    a2h_r, a2h_w = os.pipe()
    os.set_blocking(a2h_r, False)
    os.set_blocking(h2a_w, False)
    return AgentLink("g", a2h_r, h2a_w, eof_before_writer=True), h2a_r, a2h_w


def _writer(fd: int, data: bytes) -> threading.Thread:
    def run():
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(fd, view[:MIB]):]
        except OSError:
            pass
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


# -- the control link -----------------------------------------------------------------------

def test_a_guest_that_does_not_read_never_blocks_the_recorder():
    link, _agent_r, _ = _pipes()
    fcntl.fcntl(link.wfd, 1031, 4096)   # F_SETPIPE_SZ: a small pipe fills at once
    t0 = time.monotonic()
    sent = [link.send("time_probe", seq=i) for i in range(20000)]
    assert time.monotonic() - t0 < 2.0
    assert sent[-1] is None and link.not_sent > 0
    assert link.queued <= control.MAX_QUEUED
    assert "does not read its control port" in link.describe_errors()


def test_an_unsolicited_blob_is_skipped_not_buffered():
    link, _, agent_w = _pipes()
    head = P.header(P.OK, {"id": 10 ** 9}, 64 * MIB)
    t = _writer(agent_w, head + bytes(64 * MIB))
    peak = 0
    deadline = time.monotonic() + 30
    while t.is_alive() or link.pump(0):
        link.pump(0.05)
        peak = max(peak, link.decoder.pending)
        assert time.monotonic() < deadline
    link.pump(0.05)
    assert peak < 2 * control.READ_CHUNK and link.kept_bytes == 0 and not link.replies
    assert link.unsolicited == 1 and link.junk >= 64 * MIB
    assert "control port flooded" in (link.misbehaviour() or "")


def test_only_awaited_replies_are_kept_and_late_ones_are_no_junk():
    link, _, agent_w = _pipes()
    rid = link.send("stats")
    gone = link.send("stats")
    link.forget(gone)
    frames = [P.encode(P.msg("stats", id=rid, cpus={})), P.encode(P.msg("stats", id=gone, cpus={})),
              P.encode(P.msg("stats", id=rid, cpus={})), P.encode(P.msg("ok", id="x"))]
    os.write(agent_w, b"".join(frames))
    link.pump(1.0)
    assert link.take(rid) is not None and link.take(rid) is None
    assert link.late == 1 and link.unsolicited == 2          # a second answer is junk
    assert link.junk == len(frames[2]) + len(frames[3])


def test_kept_replies_are_capped_in_bytes():
    link, _, agent_w = _pipes()
    rids = [link.send("stats") for _ in range(40)]
    pad = "x" * (400 << 10)
    t = _writer(agent_w, b"".join(P.encode(P.msg("stats", id=r, pad=pad)) for r in rids))
    while t.is_alive() or link.pump(0):
        link.pump(0.05)
    assert link.kept_bytes <= control.MAX_KEPT_BYTES
    assert 0 < len(link.replies) < len(rids) and link.unsolicited == len(rids) - len(link.replies)


def test_one_pump_reads_one_share():
    link, _, agent_w = _pipes()
    fcntl.fcntl(agent_w, 1031, 1 << 20)
    os.write(agent_w, bytes(1 << 20))
    t0 = time.monotonic()
    assert link.pump(0) is True          # more is waiting
    assert link.received <= control.TURN_BYTES and time.monotonic() - t0 < 1.0


def test_a_malformed_reply_ends_the_wait_for_it():
    link, _, agent_w = _pipes()
    req = Request(link, "hello", timeout=60, every=10)
    bad = b'{"id": 1, "cpus": [18446744073709551616]}'
    os.write(agent_w, P.HEADER.pack(P.MAGIC, P.VERSION, P.HELLO, 0, len(bad), 0) + bad)
    t0 = time.monotonic()
    while not req.poll():
        link.pump(0.05)
    assert req.malformed and req.reply is None and time.monotonic() - t0 < 5
    assert "outside 64 bits" in link.last_error


def test_fds_past_1023_work(tmp_path):
    """poll, not select: a recording of many guests x CPUs has descriptors past 1023."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2100:
        pytest.skip("descriptor limit too low")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2100), hard))
    try:
        replies_r, replies_w = os.pipe()
        requests_r, requests_w = os.pipe()
        hi_r, hi_w = os.dup2(replies_r, 2000), os.dup2(requests_w, 2001)
        for fd in (replies_r, requests_w):
            os.close(fd)
        os.set_blocking(hi_r, False)
        link = AgentLink("g", hi_r, hi_w, eof_before_writer=True)
        rid = link.send("stats")
        assert P.Decoder(allow_orders=False).feed(os.read(requests_r, 4096))[0].get("id") == rid
        os.write(replies_w, P.encode(P.msg("stats", id=rid, cpus={})))
        assert link.wait(rid, 5.0) is not None
        os.close(replies_w)
        os.close(requests_r)
    finally:
        for fd in (2000, 2001):
            try:
                os.close(fd)
            except OSError:
                pass
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# -- guest values --------------------------------------------------------------------------

@pytest.mark.parametrize("cpus", ["x", [1 << 64], [True], [0, 0], list(range(2000)), [-1], [1.0], None])
def test_hello_cpus_must_be_cpu_numbers(cpus):
    with pytest.raises(VmtraceError, match="cpus"):
        guestdata.check_hello({"cpus": cpus})


def test_hello_text_is_kept_harmless():
    cpus, info = guestdata.check_hello({"cpus": [0, 1], "hostname": "a\nb\x1b" + "x" * 500, "nr_cpus": 1 << 70,
                                        "kernel": {"x": 1}, "running": True})
    assert cpus == [0, 1] and info["running"] is True
    assert "\n" not in info["hostname"] and len(info["hostname"]) <= guestdata.MAX_TEXT + 3
    assert "nr_cpus" not in info and "kernel" not in info


@pytest.mark.parametrize("cpus", [{"0": 5}, [1], {"0": {"entries": -1}}, {"0": {"entries": True}},
                                  {"0": {"entries": 1.5}}, {"0": {"entries": 1 << 64}}, {"x": {}},
                                  {"\u00b2": {}}, {"0": {"a b": 1}}, {"0": {str(i): 1 for i in range(40)}}])
def test_stats_of_the_wrong_shape_are_refused(cpus):
    assert guestdata.check_stats({"cpus": cpus}, 2) is None


def test_stats_keep_counters_of_prepared_cpus_only():
    st = guestdata.check_stats({"cpus": {"0": {"entries": 3, "error": None}, "7": {"entries": 1}},
                                "agent": {"cpu_time_s": 0.5, "junk": [1]}, "running": "yes"}, 2)
    assert st == {"cpus": {"0": {"entries": 3, "error": None}}, "agent": {"cpu_time_s": 0.5}, "running": None}


@pytest.mark.parametrize("fields", [{"guest_ns": -1}, {"guest_ns": 1 << 63}, {"guest_ns": True},
                                    {"guest_ns": "5"}, {"guest_ns": 5.0}, {}, {"guest_ns": 5, "seq": 4}])
def test_probe_readings_must_be_int64_and_for_this_probe(fields):
    assert guestdata.check_probe(fields, 3) is None
    assert guestdata.check_probe({"guest_ns": 5, "seq": 3}, 3) == 5


def _metadata(**meta):
    base = {"page_size": 4096, "long_size": 8, "endian": "little", "clock": "local", "cpus": [0, 1], "nr_cpus": 2}
    base.update(meta)
    return {"header_page": b"hp", "header_event": b"he", "meta.json": json.dumps(base).encode()}


@pytest.mark.parametrize("meta, what", [({"nr_cpus": 1 << 32}, "nr_cpus"), ({"page_size": True}, "page_size"),
                                        ({"page_size": 3}, "page_size"), ({"long_size": 4.0}, "long_size"),
                                        ({"endian": "middle"}, "endian"), ({"clock": "a b"}, "clock"),
                                        ({"cpus": [1 << 40]}, "cpus")])
def test_meta_json_structure_is_checked(meta, what):
    from vmtrace.host.metadata import check_metadata

    with pytest.raises(VmtraceError, match="^g: metadata meta.json: %s" % what):
        check_metadata("g", _metadata(**meta), 1 << 20)


def test_kallsyms_gz_is_bounded_expanded_and_files_counted():
    from vmtrace.host.metadata import MAX_KALLSYMS, MAX_METADATA_FILES, check_metadata

    z = zlib.compressobj(1, zlib.DEFLATED, 31)
    bomb = b"".join(z.compress(bytes(MIB)) for _ in range(MAX_KALLSYMS // MIB + 1)) + z.flush()
    t0 = time.monotonic()
    with pytest.raises(VmtraceError, match="expands past"):
        check_metadata("g", dict(_metadata(), **{"kallsyms.gz": bomb}), 64 * MIB)
    assert time.monotonic() - t0 < 5
    with pytest.raises(VmtraceError, match="not valid gzip"):
        check_metadata("g", dict(_metadata(), **{"kallsyms.gz": b"\x1f\x8bjunk"}), MIB)
    many = dict(_metadata(), **{"events/s/e%d/format" % i: b"" for i in range(MAX_METADATA_FILES)})
    with pytest.raises(VmtraceError, match="files"):
        check_metadata("g", many, MIB)


def test_finish_meta_states_host_facts_and_keeps_claims_apart():
    from vmtrace.host.metadata import check_metadata, finish_meta

    files, meta = check_metadata("g1", _metadata(hostname="otherhost", uname="Linux x", offset="99",
                                                 kernel="6.1.0"), MIB)
    out = json.loads(finish_meta(files, "g1", meta, "mono", 2, {"0": {"entries": 3, "bad": "x"}},
                                 {"0": {"received": 1, "written": 1, "dropped": 0}})["meta.json"])
    assert out["hostname"] == "g1" and out["clock"] == "mono" and out["nr_cpus"] == 2 and out["kernel"] == "6.1.0"
    assert "uname" not in out and "offset" not in out
    assert out["guest"]["hostname"] == "otherhost" and out["guest"]["offset"] == "99"
    assert out["stats"]["0"] == {"entries": 3, "host_received": 1, "host_written": 1, "host_dropped": 0}


# -- the trace.dat writer --------------------------------------------------------------------

def _fixture_md():
    from vmtrace.format.tracedat_read import open_tracedat
    from vmtrace.sources import source_metadata

    with open_tracedat(DATA / "tracedat_small_v7.dat") as src:
        return source_metadata(src)


def test_writer_takes_only_words_and_numbers_from_meta_json(tmp_path):
    from vmtrace.format.tracedat_read import open_tracedat
    from vmtrace.format.tracedat_write import write_tracedat

    md = _fixture_md()
    md["meta.json"] = json.dumps({"uname": "Linux otherhost", "offset": "1000", "date": "1", "hook": "h",
                                  "trace_clock": "[boot]", "hostname": "a b", "kernel": "6.1", "clock": "mono\n",
                                  "agent": {"version": "1\nCPU: 9"},
                                  "stats": {"0": {"entries": 1, "x y": 2, "s": "text"}}}).encode()
    out = tmp_path / "t.dat"
    write_tracedat(out, md, {})
    with open_tracedat(out) as src:
        o = src.options
        assert o.get("uname") == "Linux unknown 6.1" and "offset" not in o and "date" not in o and "hook" not in o
        assert "trace_clock" not in o and "\n" not in o["version"]
        assert o["cpustat"] == ["CPU: 0\nentries: 1\n"]


@pytest.mark.parametrize("version", [6, 7])
def test_writer_refuses_an_absurd_cpu_count(tmp_path, version):
    from vmtrace.format.tracedat_write import write_tracedat

    md = _fixture_md()
    md["meta.json"] = json.dumps({"nr_cpus": 1 << 32}).encode()
    with pytest.raises(VmtraceError, match="cpucount 4294967296 is out of range"):
        write_tracedat(tmp_path / "t.dat", md, {}, version=version)
    assert not list(tmp_path.iterdir())


# -- session.json read back ------------------------------------------------------------------

def _session(tmp_path, **guest):
    entry = {"file": "g1.dat", "clock": "mono", "cpus": 2, "probes": [[1, 2, 3, 1]], "orders": [["start", 1, 2, 1]]}
    entry.update(guest)
    (tmp_path / "g1.dat").write_bytes(b"")
    (tmp_path / "session.json").write_text(json.dumps({"layout": "vmtrace-session", "version": 1,
                                                       "guests": {"g1": entry}}))
    return tmp_path


@pytest.mark.parametrize("guest, what", [
    ({"probes": [[1, 10 ** 4000, 3, 1]]}, "outside 64 bits"), ({"probes": [[1, float("nan"), 3]]}, "NaN"),
    ({"probes": [[5, 2, 3, 1]]}, "probe 0"), ({"probes": [[1, True, 3]]}, "probe 0"),
    ({"probes": "x"}, "probes"), ({"orders": [["start", "1", 2]]}, "order 0"), ({"cpus": "8"}, "cpus"),
    ({"clock": "mono\nx"}, "clock"), ({"file": "../x.dat"}, "inside the session"), ({"file": 5}, "inside"),
    ({"sync": {"method": "kvm", "vcpus": {"0": {"offset": 0, "frac_bits": 10 ** 9}}}}, "frac_bits")])
def test_crafted_session_json_is_one_clear_error(tmp_path, guest, what):
    from vmtrace.session import Session

    text = json.dumps({"layout": "vmtrace-session", "version": 1, "guests": {"g1": dict(
        {"file": "g1.dat", "clock": "mono", "cpus": 2, "probes": [[1, 2, 3, 1]]}, **guest)}})
    (tmp_path / "g1.dat").write_bytes(b"")
    (tmp_path / "session.json").write_text(text)
    with pytest.raises(VmtraceError) as exc:
        s = Session(str(tmp_path), reader=lambda p: [])
        s.clock_map("g1")
    assert what in str(exc.value) and "\n" not in str(exc.value)


def test_check_cli_on_a_crafted_session_exits_2_with_one_line(tmp_path, capsys):
    from vmtrace import cli

    _session(tmp_path, probes=[[1, 10 ** 4000, 3, 1]])
    assert cli.main(["check", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vmtrace: error:") and "outside 64 bits" in err[0]


def test_a_guest_without_a_trace_is_skipped(tmp_path):
    from vmtrace.session import Session

    _session(tmp_path)
    doc = json.loads((tmp_path / "session.json").read_text())
    doc["guests"]["bad"] = {"file": None, "problems": ["bad: metadata is over the cap"], "probes": "junk"}
    (tmp_path / "session.json").write_text(json.dumps(doc))
    s = Session(str(tmp_path), reader=lambda p: [])
    assert s.guests == ["g1"] and s.skipped == {"bad": "bad: metadata is over the cap"}


class _Ev:
    def __init__(self, ts, buf):
        self.ts, self.cpu, self.kind, self.name, self.fields = ts, 0, "event", "print", {"buf": buf}


def test_marker_seq_is_ascii_digits_only(tmp_path):
    from vmtrace.clocksync import marker_seq
    from vmtrace.session import Session

    assert marker_seq({"seq": "\u00b2"}) is None and marker_seq({"seq": "12"}) == 12
    assert marker_seq({"seq": "1" * 40}) is None
    _session(tmp_path)
    events = [_Ev(10, "vmtrace-probe seq=\u00b2"), _Ev(11, "vmtrace-probe seq=1"), _Ev(1 << 64, "vmtrace-probe seq=2")]
    s = Session(str(tmp_path), reader=lambda p: events)
    assert s.probe_markers("g1") == [([1, 2, 3, 1], 11)]


def test_events_off_the_int64_scale_are_one_clear_error(tmp_path):
    from vmtrace.session import Session

    _session(tmp_path, probes=[[1, 2, 3, 1], [5, 6, 7, 2]])
    s = Session(str(tmp_path), reader=lambda p: [_Ev(1 << 64, "x")])
    with pytest.raises(VmtraceError, match="beyond int64"):
        list(s.events("g1"))


# -- the prepared directory ------------------------------------------------------------------

def test_a_port_swapped_for_a_symlink_is_refused(tmp_path):
    from vmtrace.host.layout import open_dir_checked, prepare
    from vmtrace.host.transport.fifo import open_port

    lay = prepare("g", 1, str(tmp_path))
    os.mkfifo(tmp_path / "elsewhere")
    os.unlink(lay.cpu(0) + ".out")
    os.symlink(tmp_path / "elsewhere", lay.cpu(0) + ".out")
    dfd = open_dir_checked(lay.path)
    try:
        with pytest.raises(VmtraceError, match="symlink"):
            open_port(dfd, "trace-path-cpu0.out", os.O_RDONLY, lay.cpu(0) + ".out")
        with pytest.raises(VmtraceError, match="no longer our FIFO|cannot open"):
            (Path(lay.path) / "plain").write_text("")
            open_port(dfd, "plain", os.O_RDONLY, "plain")
    finally:
        os.close(dfd)


def test_progress_table_survives_any_stats_shape():
    from types import SimpleNamespace

    from vmtrace.host.progress import Progress, summary_table

    stream = SimpleNamespace(stats=lambda: {"written": 1, "pages": 0, "dropped_pages": 0, "error": None})
    for agent in ({"0": 5}, {"0": {"lost_events": "x"}}, [], None):
        g = SimpleNamespace(name="g", agent_stats=agent, streams={0: stream}, state="running")
        Progress(None).table(SimpleNamespace(started_ns=0, outdir="o", guests={"g": g}))
        summary_table({"guests": {"g": {"stats": {"host": {"0": {"written": 1, "pages": 0, "dropped_pages": 0}},
                                                  "agent": agent}, "cpus": 1, "probes": [], "file": "g.dat"}}})


# -- the decoder -----------------------------------------------------------------------------

def test_near_magic_garbage_costs_linear_time_and_one_report_per_feed():
    """A stream of 'VMTR' + junk made the decoder copy its buffer per 16 bytes (1.5 s
    per MiB, quadratic) and return 130k exceptions per MiB."""
    dec = P.Decoder(allow_orders=False)
    chunk = (P.MAGIC + b"x" * 12) * (1 << 16)
    t0 = time.monotonic()
    for _ in range(8):
        items = dec.feed(chunk)
        assert len(items) == 1 and isinstance(items[0], P.ProtocolError)
    assert time.monotonic() - t0 < 30.0
    assert dec.errors >= 8 * (1 << 16) and dec.pending < 16


@pytest.mark.parametrize("name", ["header_page\n", "events/a/b/format\n"])
def test_names_with_a_trailing_newline_are_refused(name):
    """"$" also matches before a final newline; the checks use \\Z."""
    from vmtrace.host.layout import check_guest_name

    assert not P.METADATA_NAME.match(name)
    assert guestdata.clock_name("mono\n") is None and guestdata.token("6.1\n") is None
    with pytest.raises(VmtraceError):
        check_guest_name("g1\n")
