"""DownloadManager against the local fake Hub with the real huggingface_hub client:
progress, cancel, resume (in-call, after a failure, after a restart), queue, errors."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from engine.loader import hub_fetch
from app.services.downloads import CANCELLED, DONE, FAILED, PAUSED, QUEUED, RUNNING, DownloadManager
from tests.app.hub_fixtures import GATED, GGUF_REPO, GOOD_TOKEN, TINY, fake_hub, repo_files, safetensors_bytes

__all__ = ["fake_hub"]

WEIGHTS = "model.safetensors"
MODEL_FILES = {"config.json", WEIGHTS, "tokenizer.json"}
TIMEOUT = 30


@pytest.fixture
def managers():
    """Make managers that are always shut down, so no worker outlives its test."""
    made: list[DownloadManager] = []

    def make(**kwargs) -> DownloadManager:
        kwargs.setdefault("retry_wait_s", 0.01)
        m = DownloadManager(**kwargs)
        made.append(m)
        return m

    yield make
    for m in made:
        m.shutdown()


def _partials(cache: Path) -> list[Path]:
    return list(cache.rglob("*.incomplete")) if cache.exists() else []


def _record(manager):
    events, lock = [], threading.Lock()

    def on(status):
        with lock:
            events.append(status)

    manager.subscribe(on)
    return events


def test_download_into_the_hf_cache_with_progress(fake_hub, managers):
    from huggingface_hub import snapshot_download

    fake_hub.throttle(WEIGHTS, 0.03, chunk_size=32 * 1024)  # ~0.6 s in 20 pieces: several progress events
    m = managers()
    events = _record(m)
    status = m.wait(m.enqueue(TINY), TIMEOUT)
    files = repo_files()[TINY]
    assert status.state == DONE, status.error
    total = sum(len(files[n]) for n in MODEL_FILES)
    assert status.bytes_done == status.bytes_total == total
    # The snapshot holds the model files only (no README, no pickle), byte for byte.
    path = Path(status.path)
    assert {p.name for p in path.iterdir()} == MODEL_FILES
    for name in MODEL_FILES:
        assert (path / name).read_bytes() == files[name]
    # huggingface_hub itself sees a complete cache entry: offline snapshot of "main" resolves.
    assert Path(snapshot_download(TINY, local_files_only=True)) == path
    assert fake_hub.downloads(WEIGHTS) == 1 and _partials(fake_hub.cache) == []
    # Progress: states in order, bytes never go back, speed and ETA were reported.
    states = [e.state for e in events]
    assert states[0] == QUEUED and RUNNING in states and states[-1] == DONE
    running = [e for e in events if e.state == RUNNING and e.bytes_total]
    done_bytes = [e.bytes_done for e in running]
    assert done_bytes == sorted(done_bytes) and len(set(done_bytes)) >= 3
    assert any(e.speed_bps > 0 and e.eta_s is not None for e in running)
    assert any(e.current_file == WEIGHTS for e in running)


def test_cancel_stops_the_transfer_and_deletes_the_partial(fake_hub, managers):
    m = managers()
    did, status, _ = _stop_midway(fake_hub, m, m.cancel)   # ~100 KB of the weights were on disk
    assert status.state == CANCELLED and not status.partial_kept
    assert _partials(fake_hub.cache) == []
    assert fake_hub.bytes_sent(WEIGHTS) < len(repo_files()[TINY][WEIGHTS])
    # The bar no longer counts the deleted bytes: only config.json (fetched before) is on disk.
    assert status.bytes_done == len(repo_files()[TINY]["config.json"])
    # Retry starts again; the small files already done are not fetched twice.
    fake_hub.throttle(WEIGHTS, 0.0)
    m.retry(did)
    assert m.wait(did, TIMEOUT).state == DONE
    assert fake_hub.downloads("config.json") == 1


def _gets(fake_hub, filename):
    """The log entries of every GET of ``filename`` (its Range header and bytes sent)."""
    return [e for e in fake_hub.log
            if e["method"] == "GET" and "/resolve/" in e["path"] and e["path"].endswith("/" + filename)]


def _stop_midway(fake_hub, m, action):
    """Start tiny-chat slowly, call ``action(id)`` once the weights are under way, wait
    until it has stopped, and return (id, status, bytes of the partial file kept)."""
    fake_hub.throttle(WEIGHTS, 0.05, chunk_size=16 * 1024)   # ~2 s for the whole file
    started = threading.Event()
    m.subscribe(lambda s: started.set() if s.current_file == WEIGHTS and s.bytes_done > 100_000 else None)
    did = m.enqueue(TINY)
    assert started.wait(TIMEOUT)
    action(did)
    status = m.wait(did, TIMEOUT)
    partials = _partials(fake_hub.cache)
    return did, status, (partials[0].stat().st_size if partials else 0)


def _assert_resumed_from(fake_hub, kept, status):
    """The last GET of the weights asked for the bytes after ``kept`` and got only those."""
    size = len(repo_files()[TINY][WEIGHTS])
    last = _gets(fake_hub, WEIGHTS)[-1]
    assert last["range"] == f"bytes={kept}-" and last["sent"] == size - kept
    assert len(_gets(fake_hub, WEIGHTS)) == 2    # nothing was fetched from byte 0 again
    assert status.state == DONE and (Path(status.path) / WEIGHTS).read_bytes() == repo_files()[TINY][WEIGHTS]


def test_pause_keeps_the_partial_and_resume_continues_from_it(fake_hub, managers):
    m = managers()
    did, status, kept = _stop_midway(fake_hub, m, m.pause)
    assert status.state == PAUSED and kept > 100_000
    # The bar stays where it was: config.json plus the bytes of the weights on disk.
    assert status.bytes_done == len(repo_files()[TINY]["config.json"]) + kept
    fake_hub.throttle(WEIGHTS, 0.0)
    m.resume(did)
    _assert_resumed_from(fake_hub, kept, m.wait(did, TIMEOUT))


def test_a_paused_download_stays_paused_across_a_restart(fake_hub, managers):
    first = managers()
    did, status, kept = _stop_midway(fake_hub, first, first.pause)
    first.shutdown()
    fake_hub.throttle(WEIGHTS, 0.0)
    again = managers()                              # autostart: queued ones would go on now
    (restored,) = again.list()
    assert (restored.id, restored.state, restored.bytes_done) == (did, PAUSED, status.bytes_done)
    assert len(_gets(fake_hub, WEIGHTS)) == 1       # not resumed by itself
    assert again.enqueue(TINY) == did               # asking again resumes the paused one
    _assert_resumed_from(fake_hub, kept, again.wait(did, TIMEOUT))


def test_cancel_can_keep_the_partial_and_retry_continues_from_it(fake_hub, managers):
    m = managers()
    did, status, kept = _stop_midway(fake_hub, m, lambda d: m.cancel(d, keep_partial=True))
    assert status.state == CANCELLED and status.partial_kept and kept > 100_000
    assert status.bytes_done == len(repo_files()[TINY]["config.json"]) + kept
    m.shutdown()
    again = managers()                              # kept across a restart, too
    assert again.get(did).partial_kept
    fake_hub.throttle(WEIGHTS, 0.0)
    again.retry(did)
    status = again.wait(did, TIMEOUT)
    _assert_resumed_from(fake_hub, kept, status)
    assert not status.partial_kept


def test_pause_and_cancel_a_queued_or_paused_download(fake_hub, managers):
    fake_hub.throttle(WEIGHTS, 0.02, chunk_size=64 * 1024)
    m = managers(max_parallel=1)
    a = m.enqueue(TINY)
    b = m.enqueue(GGUF_REPO, files=["tiny-chat.Q8_0.gguf"])
    m.pause(b)
    assert m.get(b).state == PAUSED                 # at once: it was only waiting
    assert m.wait(a, TIMEOUT).state == DONE and m.get(b).state == PAUSED
    m.resume(b)
    assert m.wait(b, TIMEOUT).state == DONE
    # Pause and Resume straight away (before the worker noticed the pause) loses nothing.
    fake_hub.throttle("tiny-chat.Q4_K_M.gguf", 0.02, chunk_size=16 * 1024)
    c = m.enqueue(GGUF_REPO, files=["tiny-chat.Q4_K_M.gguf"])
    m.pause(c)
    m.resume(c)
    assert m.wait(c, TIMEOUT).state == DONE
    # A paused download can be cancelled; its partial file goes unless kept.
    fake_hub.add_repo("acme/other", {"w.safetensors": safetensors_bytes({"w": (200_000,)}), "config.json": b"{}"})
    fake_hub.throttle("w.safetensors", 0.05, chunk_size=16 * 1024)
    d = m.enqueue("acme/other")
    started = threading.Event()
    m.subscribe(lambda s: started.set() if s.id == d and s.current_file == "w.safetensors" and s.bytes_done > 2
                else None)
    assert started.wait(TIMEOUT)
    m.pause(d)
    assert m.wait(d, TIMEOUT).state == PAUSED and len(_partials(fake_hub.cache)) == 1
    m.cancel(d)
    assert m.get(d).state == CANCELLED and _partials(fake_hub.cache) == []
    assert m.get(d).bytes_done == 2                 # config.json ("{}") is all that is left


def test_dropped_connection_resumes_with_a_range_request(fake_hub, managers):
    size = len(repo_files()[TINY][WEIGHTS])
    fake_hub.interrupt(WEIGHTS, after_bytes=400_000)
    m = managers(max_retries=2)
    status = m.wait(m.enqueue(TINY), TIMEOUT)
    assert status.state == DONE, status.error
    first, second = fake_hub.ranges(WEIGHTS)
    assert first is None and second.startswith("bytes=")
    start = int(second[len("bytes="):-1])
    assert 0 < start <= 400_000
    # Only the missing tail was sent again, and the file is intact.
    assert fake_hub.bytes_sent(WEIGHTS) == 400_000 + (size - start)
    assert (Path(status.path) / WEIGHTS).read_bytes() == repo_files()[TINY][WEIGHTS]


def test_failed_download_resumes_from_the_partial_file_after_a_restart(fake_hub, managers, tmp_path):
    size = len(repo_files()[TINY][WEIGHTS])
    fake_hub.interrupt(WEIGHTS, after_bytes=300_000)
    first = managers(max_retries=0)
    did = first.enqueue(TINY)
    status = first.wait(did, TIMEOUT)
    assert status.state == FAILED and status.error_kind == "offline"
    assert "connection dropped" in status.error and "Retry" in status.error
    (partial,) = _partials(fake_hub.cache)
    kept = partial.stat().st_size
    assert 0 < kept <= 300_000 and partial.name.endswith(".incomplete")
    first.shutdown()

    again = managers()          # a new app session: the queue comes back from JSON
    (restored,) = again.list()
    assert (restored.id, restored.state, restored.repo_id) == (did, FAILED, TINY)
    again.retry(did)
    status = again.wait(did, TIMEOUT)
    assert status.state == DONE, status.error
    assert fake_hub.ranges(WEIGHTS)[-1] == f"bytes={kept}-"
    assert fake_hub.bytes_sent(WEIGHTS) == 300_000 + (size - kept)
    assert (Path(status.path) / WEIGHTS).read_bytes() == repo_files()[TINY][WEIGHTS]


def test_a_server_that_ignores_range_restarts_the_file_cleanly(fake_hub, managers):
    size = len(repo_files()[TINY][WEIGHTS])
    fake_hub.ignore_ranges = True
    fake_hub.interrupt(WEIGHTS, after_bytes=300_000)
    m = managers(max_retries=2)
    events = _record(m)
    status = m.wait(m.enqueue(TINY), TIMEOUT)
    assert status.state == DONE, status.error
    assert fake_hub.ranges(WEIGHTS)[1] is not None and fake_hub.bytes_sent(WEIGHTS) == 300_000 + size
    assert (Path(status.path) / WEIGHTS).read_bytes() == repo_files()[TINY][WEIGHTS]
    # Progress went back when the file restarted, and never counted past the total.
    assert status.bytes_done == status.bytes_total
    assert all(e.bytes_done <= (e.bytes_total or 0) for e in events if e.bytes_total)


def test_a_corrupted_partial_is_caught_by_its_sha256(fake_hub, managers):
    fake_hub.interrupt(WEIGHTS, after_bytes=300_000)
    m = managers(max_retries=0)
    did = m.enqueue(TINY)
    assert m.wait(did, TIMEOUT).state == FAILED
    (partial,) = _partials(fake_hub.cache)
    data = bytearray(partial.read_bytes())
    data[1000:1010] = b"\xff" * 10          # damage already-downloaded bytes (a bad disk, a crash)
    partial.write_bytes(bytes(data))
    m.retry(did)
    status = m.wait(did, TIMEOUT)
    assert status.state == FAILED and "corrupted while resuming" in status.error
    assert _partials(fake_hub.cache) == []  # the bad copy is gone ...
    m.retry(did)                            # ... so a retry fetches it whole
    status = m.wait(did, TIMEOUT)
    assert status.state == DONE and (Path(status.path) / WEIGHTS).read_bytes() == repo_files()[TINY][WEIGHTS]
    assert fake_hub.ranges(WEIGHTS)[-1] is None


def test_quitting_mid_download_resumes_on_the_next_start(fake_hub, managers):
    fake_hub.throttle(WEIGHTS, 0.1, chunk_size=16 * 1024)   # ~4 s: time to quit half-way
    first = managers()
    half = threading.Event()
    first.subscribe(lambda s: half.set() if s.current_file == WEIGHTS and s.bytes_done > 200_000 else None)
    did = first.enqueue(TINY)
    assert half.wait(TIMEOUT)
    first.shutdown()
    assert first.get(did).state == QUEUED          # not cancelled: will resume
    (partial,) = _partials(fake_hub.cache)
    kept = partial.stat().st_size
    assert kept > 0

    fake_hub.throttle(WEIGHTS, 0.0)
    second = managers()                             # autostart picks the queue up
    status = second.wait(did, TIMEOUT)
    assert status.state == DONE, status.error
    assert fake_hub.ranges(WEIGHTS)[-1] == f"bytes={kept}-"
    assert (Path(status.path) / WEIGHTS).read_bytes() == repo_files()[TINY][WEIGHTS]


def test_several_downloads_queue_and_run_in_order(fake_hub, managers):
    fake_hub.throttle(WEIGHTS, 0.02, chunk_size=64 * 1024)
    m = managers(max_parallel=1)
    a = m.enqueue(TINY)
    b = m.enqueue(GGUF_REPO, files=["tiny-chat.Q4_K_M.gguf"])
    assert m.enqueue(TINY) == a                      # the same download is not queued twice
    assert m.get(b).state == QUEUED
    assert m.wait(a, TIMEOUT).state == DONE
    gguf = m.wait(b, TIMEOUT)
    assert gguf.state == DONE
    # A single picked file: the path is that file, ready to load.
    assert Path(gguf.path).name == "tiny-chat.Q4_K_M.gguf"
    assert Path(gguf.path).read_bytes() == repo_files()[GGUF_REPO]["tiny-chat.Q4_K_M.gguf"]
    # b ran only after a finished.
    order = [(e["path"].rsplit("/", 1)[-1]) for e in fake_hub.log if e["method"] == "GET" and "/resolve/" in e["path"]]
    assert order.index("tiny-chat.Q4_K_M.gguf") > order.index(WEIGHTS)
    # Asking again for what is already cached finishes at once, with no new transfer.
    again = m.wait(m.enqueue(GGUF_REPO, files=["tiny-chat.Q4_K_M.gguf"]), TIMEOUT)
    assert again.state == DONE and again.path == gguf.path and again.id != b
    assert fake_hub.downloads("tiny-chat.Q4_K_M.gguf") == 1


def test_cancel_a_queued_download(fake_hub, managers):
    fake_hub.throttle(WEIGHTS, 0.05, chunk_size=16 * 1024)
    m = managers(max_parallel=1)
    a = m.enqueue(TINY)
    b = m.enqueue(GGUF_REPO, files=["tiny-chat.Q8_0.gguf"])
    m.cancel(b)
    assert m.get(b).state == CANCELLED
    m.cancel(a)
    assert m.wait(a, TIMEOUT).state == CANCELLED
    assert fake_hub.downloads("tiny-chat.Q8_0.gguf") == 0


def test_gated_repo_needs_accepted_terms_and_a_token(fake_hub, managers):
    m = managers()
    status = m.wait(m.enqueue(GATED), TIMEOUT)
    assert status.state == FAILED and status.error_kind == "gated"
    assert status.error_url == f"https://huggingface.co/{GATED}"
    assert f"accept its terms while logged in at https://huggingface.co/{GATED}" in status.error
    token = {"value": GOOD_TOKEN}
    ok = managers(token_provider=lambda: token["value"], state_file=Path(m._state_file).with_name("b.json"))
    assert ok.wait(ok.enqueue(GATED), TIMEOUT).state == DONE


def test_rejected_token_is_401(fake_hub, managers):
    fake_hub.valid_tokens = {GOOD_TOKEN}
    m = managers(token_provider=lambda: "hf_revoked0000")
    status = m.wait(m.enqueue(TINY), TIMEOUT)
    assert status.state == FAILED and status.error_kind == "unauthorized"
    assert "rejected the access token" in status.error and "hf_revoked0000" not in status.error


def test_unknown_repo_and_file_are_not_found(fake_hub, managers):
    m = managers()
    status = m.wait(m.enqueue("nobody/nothing"), TIMEOUT)
    assert status.state == FAILED and status.error_kind == "not_found"
    assert "'nobody/nothing' was not found on the Hub" in status.error
    status = m.wait(m.enqueue(TINY, files=["gone.gguf"]), TIMEOUT)
    assert status.error_kind == "not_found" and "gone.gguf" in status.error


def test_repos_without_safetensors_say_what_to_pick(fake_hub, managers):
    m = managers()
    status = m.wait(m.enqueue(GGUF_REPO), TIMEOUT)
    assert status.state == FAILED and "pick one of them" in status.error
    fake_hub.add_repo("old/pickle-only", {"config.json": b"{}", "pytorch_model.bin": b"x"})
    status = m.wait(m.enqueue("old/pickle-only"), TIMEOUT)
    assert status.state == FAILED and "never downloads pickle" in status.error


def test_disk_full(fake_hub, managers, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(hub_fetch.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    m = managers()
    status = m.wait(m.enqueue(TINY), TIMEOUT)
    assert status.state == FAILED and status.error_kind == "disk_full"
    assert "not enough disk space" in status.error
    # Units that fit the numbers (issue 12: "needs 0.0 GiB more ... has 0.0 GiB free").
    assert "needs 657.0 KiB more" in status.error and "has 1000 B free" in status.error, status.error
    assert "0.0 GiB" not in status.error


def test_offline(fake_hub, managers):
    fake_hub.stop()
    m = managers()
    status = m.wait(m.enqueue(TINY), TIMEOUT)
    assert status.state == FAILED and status.error_kind == "offline"
    assert "check the network" in status.error


def test_queue_state_file_survives_and_forgets(fake_hub, managers):
    m = managers(autostart=False)
    did = m.enqueue(TINY)
    m.shutdown()
    restored = managers(autostart=False)
    assert [(s.id, s.state) for s in restored.list()] == [(did, QUEUED)]
    restored.cancel(did)
    restored.remove(did)
    assert managers(autostart=False).list() == []


def test_the_token_goes_to_the_hub_only_never_to_a_cdn(fake_hub):
    from engine.api import sends_token_to

    assert sends_token_to(f"{fake_hub.url}/acme/x/resolve/main/model.safetensors")
    assert sends_token_to("https://huggingface.co/acme/x/resolve/main/a.bin")
    assert not sends_token_to("https://cas-bridge.xethub.hf.co/xet-bridge-us/abc?X-Amz-Expires=3600")
    assert not sends_token_to("https://cdn-lfs-us-1.hf.co/repos/ab/cd/sha")
    assert not sends_token_to("https://some-bucket.s3.amazonaws.com/blob?sig=1")


def test_removing_a_failed_download_deletes_its_partial_file(fake_hub, managers):
    fake_hub.interrupt(WEIGHTS, after_bytes=300_000)
    m = managers(max_retries=0)
    did = m.enqueue(TINY)
    assert m.wait(did, TIMEOUT).state == FAILED
    assert len(_partials(fake_hub.cache)) == 1  # kept while Retry can still use it
    m.remove(did)
    assert _partials(fake_hub.cache) == [] and m.list() == []


def test_offline_after_a_restart_says_offline_not_connection_dropped(fake_hub, managers):
    fake_hub.interrupt(WEIGHTS, after_bytes=300_000)
    first = managers(max_retries=0)
    did = first.enqueue(TINY)
    assert first.wait(did, TIMEOUT).state == FAILED  # half done: bytes_done > 0 is saved
    first.shutdown()
    fake_hub.stop()  # the next session has no network at all
    again = managers()
    again.retry(did)
    status = again.wait(did, TIMEOUT)
    assert status.state == FAILED and status.error_kind == "offline"
    assert "connection dropped" not in status.error and "check the network" in status.error


def test_one_part_of_a_split_gguf_is_refused_with_advice(fake_hub, managers):
    fake_hub.add_repo("acme/huge-GGUF", {"huge.Q4_K_M-00001-of-00002.gguf": b"GGUF1",
                                         "huge.Q4_K_M-00002-of-00002.gguf": b"GGUF2"})
    m = managers()
    status = m.wait(m.enqueue("acme/huge-GGUF", files=["huge.Q4_K_M-00001-of-00002.gguf"]), TIMEOUT)
    assert status.state == FAILED and "split into several files" in status.error
    assert "single-file quantization" in status.error


def test_a_refused_storage_link_mid_file_says_retry_not_token(fake_hub, managers, monkeypatch):
    """Signed storage links expire; a 403 in the middle of a file is not the token's fault."""
    class Expired(Exception):
        response = type("R", (), {"status_code": 403})()

    def refuse(*_a, **_k):
        raise Expired("403 Forbidden: Request has expired")

    monkeypatch.setattr(hub_fetch, "fetch_resumable", refuse)
    m = managers(max_retries=0)
    status = m.wait(m.enqueue(TINY), TIMEOUT)
    assert status.state == FAILED and "link expired" in status.error and "Retry" in status.error
    assert "token" not in status.error
