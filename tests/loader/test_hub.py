"""Hub repo ids, resolved through a local fake Hub with the real huggingface_hub client."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from engine.errors import ModelLoadError
from engine.loader.resolve import resolve_model
from engine.loader.weights import iter_weights
from tests.loader.conftest import TINY_REPO


def test_repo_id_downloads_then_works_offline(hub_server, tiny_llama, monkeypatch):
    resolved = resolve_model(TINY_REPO)
    assert resolved.source == "hub"
    assert resolved.name == TINY_REPO
    names = {p.name for p in resolved.path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    # allow_patterns keeps pickle weights and docs out.
    assert "pytorch_model.bin" not in names and "README.md" not in names
    expected = tiny_llama.state_dict()
    for name, tensor in iter_weights(resolved.path):
        assert torch.equal(tensor, expected[name]), name
    assert hub_server.downloads("model.safetensors") == 1

    # HF_HUB_OFFLINE set after import: served from the cache without any request.
    seen = len(hub_server.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model(TINY_REPO) == resolved
    assert len(hub_server.requests) == seen
    monkeypatch.delenv("HF_HUB_OFFLINE")

    # Hub unreachable: falls back to the cache.
    hub_server.stop()
    assert resolve_model(TINY_REPO) == resolved


def test_second_online_resolve_does_not_download_again(hub_server):
    first = resolve_model(TINY_REPO)
    again = resolve_model(TINY_REPO, revision="main")
    assert again == first
    assert hub_server.downloads("model.safetensors") == 1


def test_a_cached_repo_the_hub_no_longer_shows_loads_from_the_cache(hub_server):
    """A repo deleted from the Hub, or made private and fetched without its token (the Hub
    answers RepoNotFound), still loads from the cache, as huggingface_hub's own fetch does."""
    first = resolve_model(TINY_REPO)
    hub_server.repos.pop(TINY_REPO)
    assert resolve_model(TINY_REPO) == first


def test_unknown_repo(hub_server):
    with pytest.raises(ModelLoadError, match=r"unknown model 'someone/nothing-here'.*no such repo on the Hub"):
        resolve_model("someone/nothing-here")


def test_single_name_unknown(hub_server):
    with pytest.raises(ModelLoadError, match="no such repo"):
        resolve_model("nonexistent-model-name")


def test_unknown_revision(hub_server):
    with pytest.raises(ModelLoadError, match="no revision 'v9'"):
        resolve_model(TINY_REPO, revision="v9")


def test_gated_repo(hub_server, tiny_model_dir):
    files = {p.name: p.read_bytes() for p in tiny_model_dir.iterdir() if p.is_file()}
    hub_server.add_repo("corp/gated-llama", files, gated=True, allowed_tokens={"hf_good"})
    with pytest.raises(ModelLoadError, match=r"https://huggingface.co/corp/gated-llama.*HF_TOKEN"):
        resolve_model("corp/gated-llama")


def test_gated_repo_with_token(hub_server, tiny_model_dir, monkeypatch):
    files = {p.name: p.read_bytes() for p in tiny_model_dir.iterdir() if p.is_file()}
    hub_server.add_repo("corp/gated-llama", files, gated=True, allowed_tokens={"hf_good"})
    monkeypatch.setenv("HF_TOKEN", "hf_good")
    assert resolve_model("corp/gated-llama").source == "hub"


def test_offline_and_not_cached(hub_server, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache.*offline mode is on"):
        resolve_model(TINY_REPO)


def test_unreachable_and_not_cached(hub_server):
    hub_server.stop()
    with pytest.raises(ModelLoadError, match="not a file or folder here.*not in the local Hugging Face cache.*unreachable"):
        resolve_model(TINY_REPO)


def test_a_listing_that_times_out_is_called_unreachable_not_a_download_cut_short(hub_server, monkeypatch):
    """A network that drops packets times out the file list, before any file: the error says
    the Hub is unreachable, not that a download failed part-way."""
    import httpx

    from engine.loader import hub_fetch

    def timed_out(*args, **kwargs):
        raise httpx.ReadTimeout("The read operation timed out")

    import huggingface_hub

    real = huggingface_hub.snapshot_download

    def cache_only(*args, **kwargs):  # the cache is looked in; the Hub is not asked a second time
        assert kwargs.get("local_files_only"), "asked the unreachable Hub again"
        return real(*args, **kwargs)

    monkeypatch.setattr(hub_fetch, "list_repo", timed_out)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", cache_only)
    with pytest.raises(ModelLoadError, match=r"not in the local Hugging Face cache, and the Hub is unreachable "
                                             r"\(HubUnreachable: ReadTimeout") as info:
        resolve_model(TINY_REPO)
    assert "part-way" not in str(info.value)


def test_repo_without_safetensors(hub_server):
    hub_server.add_repo(
        "old/bin-only",
        {"config.json": b'{"model_type": "llama"}', "pytorch_model.bin": b"x", "tokenizer.json": b"{}"},
    )
    with pytest.raises(ModelLoadError, match="old/bin-only.*safetensors"):
        resolve_model("old/bin-only")


def test_model_info_and_range(hub_server):
    from huggingface_hub import HfApi

    info = HfApi().model_info(TINY_REPO)
    assert info.sha == hub_server.repos[TINY_REPO].sha
    assert "model.safetensors" in {s.rfilename for s in info.siblings}

    url = f"{hub_server.url}/{TINY_REPO}/resolve/main/config.json"
    full = urllib.request.urlopen(url).read()
    req = urllib.request.Request(url, headers={"Range": "bytes=10-"})
    with urllib.request.urlopen(req) as resp:
        assert resp.status == 206
        assert resp.headers["Content-Range"] == f"bytes 10-{len(full) - 1}/{len(full)}"
        assert resp.read() == full[10:]
    with pytest.raises(urllib.error.HTTPError) as info404:
        urllib.request.urlopen(f"{hub_server.url}/{TINY_REPO}/resolve/main/nope.txt")
    assert info404.value.headers["X-Error-Code"] == "EntryNotFound"


def test_connection_dropping_every_time_says_what_to_do(hub_server, monkeypatch):
    """huggingface_hub lets its HTTP library's error through once its retries are spent: a
    ModelLoadError that says the download failed part-way, not a traceback."""
    from engine.loader import hub_fetch

    monkeypatch.setattr(hub_fetch, "_sleep_unless", lambda stop, seconds: False)  # 1, 2, 4 s between tries
    hub_server.short_bodies("model.safetensors", 0)
    with pytest.raises(ModelLoadError, match=r"failed part-way \(RemoteProtocolError.*Run the same command again: "
                                             r"it continues where it stopped"):
        resolve_model(TINY_REPO)
    hub_server._short.clear()
    assert resolve_model(TINY_REPO).source == "hub"  # the next run finishes the download


def test_short_responses_resume_and_are_not_called_unreachable(hub_server, monkeypatch):
    """A response that ends early, cleanly (a proxy or CDN that cuts bodies short), is
    continued with a Range request in the same run; from a server that ignores Range
    requests the download fails part-way, saying so, not that the Hub is unreachable."""
    from engine.loader import hub_fetch

    monkeypatch.setattr(hub_fetch, "_sleep_unless", lambda stop, seconds: False)
    size = len(hub_server.repos[TINY_REPO].files["model.safetensors"])
    hub_server.short_bodies("model.safetensors", size // 3 + 1, clean=True)
    assert resolve_model(TINY_REPO).source == "hub"
    ranges = hub_server.ranges("model.safetensors")
    assert len(ranges) == 3 and ranges[0] is None and ranges[1] == f"bytes={size // 3 + 1}-", ranges
    assert hub_server.bytes_sent("model.safetensors") == size

    hub_server.add_repo("someone/no-ranges", {n: d for n, d in hub_server.repos[TINY_REPO].files.items()})
    hub_server.ignore_ranges = True
    with pytest.raises(ModelLoadError, match=r"failed part-way \(TransferFailed: the server ignores requests to "
                                             r"resume model.safetensors.*Run the same command again: that file "
                                             r"is fetched again from its start") as info:
        resolve_model("someone/no-ranges")
    assert "unreachable" not in str(info.value) and "continues where it stopped" not in str(info.value)


def test_a_resumed_small_file_is_checked_against_its_git_blob_id(hub_server):
    """A file kept in git itself (config.json) has its git blob id as etag, not a sha256:
    one stitched from a partial file that isn't its start is caught and deleted too, not
    linked into the model for good; one that is its start resumes."""
    from huggingface_hub import constants

    repo = hub_server.repos[TINY_REPO]
    data = repo.files["config.json"]
    blobs = Path(constants.HF_HUB_CACHE) / "models--hearth-test--tiny-llama" / "blobs"
    blobs.mkdir(parents=True)
    partial = blobs / f"{repo.etag('config.json')}.incomplete"
    partial.write_bytes(b"X" * 10)  # not the file's bytes (a bad disk, a crash)
    with pytest.raises(ModelLoadError, match=r"config.json was corrupted while resuming; its partial copy was "
                                             r"deleted\)\. Run the same command again: that file is fetched "
                                             r"again from its start"):
        resolve_model(TINY_REPO)
    assert not partial.exists()
    partial.write_bytes(data[:10])
    resolved = resolve_model(TINY_REPO)
    assert (resolved.path / "config.json").read_bytes() == data
    assert hub_server.ranges("config.json")[-1] == "bytes=10-"


def test_a_download_link_that_expires_part_way_says_run_again(hub_server, monkeypatch):
    """The Hub's storage links are signed for about an hour: a resume after that is refused
    (403). The error says the download failed part-way and to run again (a fresh link
    continues it), not that the Hub is unreachable."""
    from engine.loader import hub_fetch
    from tests import hub_server as hub_module

    monkeypatch.setattr(hub_fetch, "_sleep_unless", lambda stop, seconds: False)
    plain = hub_module._Handler._resolve

    def expired_on_resume(self, repo_id, rev, filename, head):
        if self.headers.get("Range") and filename == "model.safetensors":
            raise hub_module._Error(403, None, "Request has expired")
        return plain(self, repo_id, rev, filename, head)

    monkeypatch.setattr(hub_module._Handler, "_resolve", expired_on_resume)
    hub_server.interrupt("model.safetensors", 300_000)
    with pytest.raises(ModelLoadError, match=r"failed part-way \(TransferFailed: the download link of "
                                             r"model.safetensors expired part-way \(403\).*Run the same "
                                             r"command again") as info:
        resolve_model(TINY_REPO)
    assert "unreachable" not in str(info.value)
    monkeypatch.setattr(hub_module._Handler, "_resolve", plain)
    assert resolve_model(TINY_REPO).source == "hub"
    assert hub_server.ranges("model.safetensors")[-1].startswith("bytes=")  # continued, not restarted


def test_a_file_another_program_is_downloading_says_wait(hub_server):
    """huggingface_hub's own lock for a blob (held by `hf download`, or another Hearth
    command) is refused at once, saying so, not waited on nor appended to."""
    from filelock import FileLock
    from huggingface_hub import constants

    etag = hub_server.repos[TINY_REPO].etag("model.safetensors")
    locks = Path(constants.HF_HUB_CACHE) / ".locks" / "models--hearth-test--tiny-llama"
    lock = FileLock(str(locks / f"{etag}.lock"))
    with lock:
        with pytest.raises(ModelLoadError, match=r"being downloaded by another program right now .*wait for that "
                                                 r"download to finish"):
            resolve_model(TINY_REPO)
        assert hub_server.downloads("model.safetensors") == 0
    assert resolve_model(TINY_REPO).source == "hub"


def test_a_repo_with_an_empty_file_downloads(hub_server):
    """An empty file (here special_tokens_map.json) has no bytes to fetch: it is linked like
    the others, not reported as a disk that refused its partial file."""
    files = dict(hub_server.repos[TINY_REPO].files, **{"special_tokens_map.json": b""})
    hub_server.add_repo("someone/empty-file", files)
    resolved = resolve_model("someone/empty-file")
    assert (resolved.path / "special_tokens_map.json").read_bytes() == b""


@pytest.mark.parametrize("how", ["ctrl-c", "should_stop"])
def test_interrupted_download_stops_at_once(hub_server, how):
    """Ctrl+C (or a cancel) during a download stops it within a chunk, instead of waiting
    for huggingface_hub's workers to finish every file in flight; the next run completes it.
    (Ctrl+C is a KeyboardInterrupt raised in the waiting thread's loop, as the signal raises
    it there: _thread.interrupt_main() proved unreliable in the whole suite, where a
    KeyboardInterrupt that lands in a finalizer is printed and dropped.)"""
    import threading
    import time

    from engine.errors import LoadCancelledError

    hub_server.throttle("model.safetensors", 0.05, 65536)  # ~1.3 MB/s: the whole file takes ~10 s
    started = threading.Event()

    def stop_soon():
        while hub_server.bytes_sent("model.safetensors") < 512 * 1024:  # (some of it written: kept)
            time.sleep(0.02)
        started.set()

    def workers() -> set:
        return {t for t in threading.enumerate()
                if t.name.startswith(("hearth-hub-download", "ThreadPoolExecutor")) and t.is_alive()}

    before = workers()  # (other tests' pools may still be alive: only this download's count)
    threading.Thread(target=stop_soon, daemon=True).start()
    t0 = time.monotonic()
    error = KeyboardInterrupt if how == "ctrl-c" else LoadCancelledError
    def ctrl_c() -> bool:
        if started.is_set():
            raise KeyboardInterrupt
        return False

    with pytest.raises(error):
        resolve_model(TINY_REPO, should_stop=started.is_set if how == "should_stop" else ctrl_c)
    assert time.monotonic() - t0 < 5
    # Its workers have ended (nothing for the interpreter to wait for at exit).
    assert not workers() - before
    hub_server._throttle.clear()
    kept = hub_server.bytes_sent("model.safetensors")
    assert resolve_model(TINY_REPO).source == "hub"
    # The next run continued the partial file (huggingface_hub alone starts over).
    size = len(hub_server.repos[TINY_REPO].files["model.safetensors"])
    assert hub_server.ranges("model.safetensors")[-1].startswith("bytes=")
    assert hub_server.bytes_sent("model.safetensors") - kept < size


def test_gguf_only_repo_says_how_to_load_a_file(hub_server):
    """A "-GGUF" repo (the usual form for llama.cpp / Ollama / LM Studio users) is named as
    such, with its files and how to load one, not called a pickle checkpoint."""
    hub_server.add_repo("someone/tiny-GGUF", {"tiny.Q4_K_M.gguf": b"GGUF" + bytes(64),
                                              "tiny.Q8_0.gguf": b"GGUF" + bytes(64), "README.md": b"x"})
    with pytest.raises(ModelLoadError, match=r"holds GGUF files \(tiny.Q4_K_M.gguf, tiny.Q8_0.gguf\).*"
                                             r"hf download someone/tiny-GGUF tiny.Q4_K_M.gguf") as info:
        resolve_model("someone/tiny-GGUF")
    assert "pickle" not in str(info.value)


def test_a_repo_whose_index_lists_a_shard_it_lacks_says_so(hub_server, tiny_model_dir):
    """Downloading again can't fix a repo that lacks a shard its index names: the error says
    the repo is incomplete (a shard missing only from the local copy still says download)."""
    import json

    files = {p.name: p.read_bytes() for p in tiny_model_dir.iterdir() if p.is_file()}
    weights = files.pop("model.safetensors")
    from safetensors import safe_open

    with safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    index = {"metadata": {}, "weight_map": {n: ("model-00001-of-00002.safetensors" if i % 2 else
                                                "model-00002-of-00002.safetensors") for i, n in enumerate(names)}}
    files["model.safetensors.index.json"] = json.dumps(index).encode()
    files["model-00001-of-00002.safetensors"] = weights  # (its contents don't matter: the check is first)
    hub_server.add_repo("someone/half-uploaded", files)
    with pytest.raises(ModelLoadError, match=r"'someone/half-uploaded' is incomplete: its "
                                             r"model.safetensors.index.json lists the weights shard "
                                             r"model-00002-of-00002.safetensors, which the repo doesn't have") as info:
        resolve_model("someone/half-uploaded")
    assert "download the model again" not in str(info.value)


def test_repo_without_any_weights(hub_server):
    hub_server.add_repo("someone/docs-only", {"README.md": b"# nothing here", "config.json": b"{}"})
    with pytest.raises(ModelLoadError, match="no model weights at all") as info:
        resolve_model("someone/docs-only")
    assert "pickle" not in str(info.value)


def test_rejected_token_is_named_not_called_unreachable(hub_server, monkeypatch):
    """A mistyped or revoked HF_TOKEN gets the Hub's 401 even on a public repo: the error
    says the token is the problem; a model already cached still loads."""
    hub_server.valid_tokens = {"hf_good"}
    monkeypatch.setenv("HF_TOKEN", "hf_typo")
    with pytest.raises(ModelLoadError, match=r"rejected the access token \(401.*HF_TOKEN") as info:
        resolve_model(TINY_REPO)
    assert "unreachable" not in str(info.value)
    monkeypatch.setenv("HF_TOKEN", "hf_good")
    cached = resolve_model(TINY_REPO)
    monkeypatch.setenv("HF_TOKEN", "hf_typo")
    assert resolve_model(TINY_REPO) == cached


def test_a_name_that_is_no_folder_and_not_cached_says_both(hub_server, monkeypatch, tmp_path):
    """Offline, a bare name could be a mistyped local folder as well as a repo id: the error
    says where it looked for a folder too."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=rf"'my-model' is not a file or folder here \({tmp_path}\).*"
                                             "offline mode.*if it is a local model, check the path"):
        resolve_model("my-model")


def test_a_full_disk_is_named_not_called_unreachable(hub_server, monkeypatch):
    """A download that the disk refuses (full, read-only) says so and where, not that the Hub
    can't be reached; once there is room the next run completes the model."""
    import builtins
    import errno

    from engine.loader import hub_fetch

    real_open = builtins.open

    def full(path, mode="r", *args, **kwargs):  # the disk fills up while the weights are written
        if str(path).endswith(".incomplete") and "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full)
    with pytest.raises(ModelLoadError, match=r"cannot download .* into the Hugging Face cache \(.*\): "
                                             r"No space left on device.*Free disk space") as info:
        resolve_model(TINY_REPO)
    assert "unreachable" not in str(info.value)
    monkeypatch.setattr(builtins, "open", real_open)

    # Too little room for what is left is said before anything is fetched.
    real_usage = hub_fetch.shutil.disk_usage
    monkeypatch.setattr(hub_fetch.shutil, "disk_usage", lambda path: type("usage", (), {"free": 1000}))
    with pytest.raises(ModelLoadError, match=r"cannot download .*: not enough disk space for model.safetensors: "
                                             r"it needs .* more and .* has 1000 B free\. Free disk space"):
        resolve_model(TINY_REPO)
    monkeypatch.setattr(hub_fetch.shutil, "disk_usage", real_usage)
    assert resolve_model(TINY_REPO).source == "hub"


@pytest.mark.parametrize("status", [500, 503, 429])
def test_a_hub_server_error_is_not_called_unreachable(hub_server, monkeypatch, status):
    """A Hub that answers a file's request with a 5xx (or 429) is up but failing: the error
    names the status and says to try again later, not to connect to the internet."""
    import time

    from tests import hub_server as hub_module

    monkeypatch.setattr(time, "sleep", lambda s: None)  # huggingface_hub retries 5xx with waits

    def failing(self, repo_id, rev, filename, head):
        raise hub_module._Error(status, None, "Internal Error")

    monkeypatch.setattr(hub_module._Handler, "_resolve", failing)
    with pytest.raises(ModelLoadError, match=rf"answered {status} .*not your connection.*again in a few minutes") as info:
        resolve_model(TINY_REPO)
    assert "unreachable" not in str(info.value) and "connect to the internet" not in str(info.value)
