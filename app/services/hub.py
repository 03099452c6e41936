"""Searching the Hugging Face Hub and reading one repo's details (Qt-free, blocking calls).

Everything goes through the real ``huggingface_hub`` client, so ``HF_ENDPOINT`` (a mirror,
or the tests' local Hub) and proxies work as they do for the engine. Calls block: the GUI
runs them on worker threads. Failures are raised as ``HubError`` whose ``kind`` and
``message`` the UI can show as is (``describe_error`` does the mapping for all services).

``token=None`` everywhere means huggingface_hub's own default (``HF_TOKEN`` or a token
saved by ``hf auth login``); pass the token from ``TokenStore`` to use the app's one.
"""

from __future__ import annotations

import errno
import json
import re
from dataclasses import dataclass, field
from datetime import datetime

#: Sort keys offered to the user -> the name ``HfApi.list_models(sort=...)`` uses.
SORTS = {"downloads": "downloads", "likes": "likes", "updated": "last_modified", "trending": "trending_score"}
_HUB_SORT_FIELD = {"downloads": "downloads", "likes": "likes", "last_modified": "lastModified",
                   "trending_score": "trendingScore"}
#: Parameter-count filters -> the Hub's ``num_parameters`` range syntax.
SIZE_FILTERS = {"any": None, "< 3B": "max:3B", "3B – 9B": "min:3B,max:9B", "9B – 35B": "min:9B,max:35B",
                "> 35B": "min:35B"}
#: Quantized formats the Hub tags models with (``filter=`` tag).
FORMAT_FILTERS = {"any": None, "safetensors": "safetensors", "GGUF": "gguf", "AWQ": "awq", "GPTQ": "gptq"}
#: What one search asks the Hub for (keeps the reply small).
_SEARCH_FIELDS = ["downloads", "likes", "lastModified", "tags", "pipeline_tag", "gated", "safetensors",
                  "gguf", "library_name"]
#: Where users accept a gated model's terms: always the public Hub site.
HUB_SITE = "https://huggingface.co"


class HubError(Exception):
    """A Hub call failed; ``message`` says what happened and what to do.

    ``kind`` is one of ``gated``, ``unauthorized``, ``not_found``, ``disk_full``, ``offline``,
    ``cancelled`` or ``other``; ``url`` is a page to open (the gated repo's page) or ``None``.
    """

    def __init__(self, kind: str, message: str, url: str | None = None) -> None:
        super().__init__(message)
        self.kind, self.message, self.url = kind, message, url


@dataclass(frozen=True, slots=True)
class ModelSummary:
    """One search result."""

    repo_id: str
    downloads: int = 0
    likes: int = 0
    last_modified: datetime | None = None
    tags: tuple[str, ...] = ()
    pipeline_tag: str | None = None
    gated: bool = False
    num_params: int | None = None
    library_name: str | None = None


@dataclass(frozen=True, slots=True)
class RepoFile:
    """One file of a repo; ``size`` in bytes (``None`` if the Hub did not say)."""

    path: str
    size: int | None = None

    @property
    def is_weights(self) -> bool:
        return self.path.endswith((".safetensors", ".gguf", ".bin", ".pt", ".pth"))


@dataclass(frozen=True, slots=True)
class ModelDetails:
    """What the details pane shows about one repo."""

    repo_id: str
    sha: str | None
    license: str | None
    gated: bool
    num_params: int | None
    params_by_dtype: dict[str, int] = field(default_factory=dict)
    files: tuple[RepoFile, ...] = ()
    card_summary: str = ""
    tags: tuple[str, ...] = ()
    pipeline_tag: str | None = None
    downloads: int = 0
    likes: int = 0
    last_modified: datetime | None = None

    @property
    def url(self) -> str:
        """The repo's page on the Hub (where gated terms are accepted)."""
        return f"{HUB_SITE}/{self.repo_id}"

    @property
    def gguf_files(self) -> tuple[RepoFile, ...]:
        return tuple(f for f in self.files if f.path.endswith(".gguf"))

    @property
    def safetensors_bytes(self) -> int:
        """Bytes of the safetensors weights (what a default download fetches, roughly)."""
        return sum(f.size or 0 for f in self.files if f.path.endswith(".safetensors"))

    @property
    def quant_format(self) -> str | None:
        """``awq`` / ``gptq`` / ``fp8`` / ``gguf`` when the repo ships pre-quantized weights
        (its tags or name say so), else ``None``."""
        if self.gguf_files and not self.safetensors_bytes:
            return "gguf"
        tags = {t.lower() for t in self.tags}
        for fmt in ("awq", "gptq", "fp8"):
            if fmt in tags or fmt in self.repo_id.lower():
                return fmt
        return None


def check_online() -> None:
    """Raise ``HubError("offline")`` when offline mode is on.

    huggingface_hub reads ``HF_HUB_OFFLINE`` once at import; a later change (a user's
    setting, a test) is honoured here too, as the engine does.

    Raises:
        HubError: offline mode is on.
    """
    import os

    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    if constants.is_offline_mode() or env in {"1", "ON", "YES", "TRUE"}:
        raise HubError("offline", "offline mode is on (HF_HUB_OFFLINE): unset it to search and download "
                       "from the Hub; models already on disk still load.")


def _api(token):
    from huggingface_hub import HfApi

    # Built per call: HfApi reads the endpoint when constructed, and HF_ENDPOINT may change.
    return HfApi(token=token)


def search_models(query: str = "", *, sort: str = "downloads", size: str = "any", fmt: str = "any",
                  task: str | None = "text-generation", limit: int = 50,
                  token: str | None = None) -> list[ModelSummary]:
    """Search Hub models whose id contains ``query``.

    Args:
        sort: a key of ``SORTS`` (results are best first).
        size: a key of ``SIZE_FILTERS`` (parameter count range).
        fmt: a key of ``FORMAT_FILTERS`` (GGUF / AWQ / GPTQ / safetensors).
        task: the pipeline tag (``None`` for any).

    Raises:
        ValueError: an unknown sort / size / format name.
        HubError: the Hub could not be reached or refused the request.
    """
    if sort not in SORTS or size not in SIZE_FILTERS or fmt not in FORMAT_FILTERS:
        raise ValueError(f"unknown search option: sort={sort!r} size={size!r} format={fmt!r}")
    check_online()
    from huggingface_hub import ModelInfo, constants
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    # The same query HfApi.list_models builds, sent once: list_models retries a refused
    # connection for ~25 s, and a search box must say "offline" at once. One page is all
    # a search shows, so no pagination either.
    params: list[tuple[str, str | int]] = [("sort", _HUB_SORT_FIELD[SORTS[sort]]), ("limit", limit)]
    params += [("expand", name) for name in _SEARCH_FIELDS]
    if query.strip():
        params.append(("search", query.strip()))
    if task:
        params.append(("pipeline_tag", task))
    if SIZE_FILTERS[size]:
        params.append(("num_parameters", SIZE_FILTERS[size]))
    if FORMAT_FILTERS[fmt]:
        params.append(("filter", FORMAT_FILTERS[fmt]))
    try:
        response = get_session().get(f"{constants.ENDPOINT}/api/models", params=params,
                                     headers=build_hf_headers(token=token), timeout=20)
        hf_raise_for_status(response)
        infos = [ModelInfo(**{"siblings": None, **item}) for item in response.json()][:limit]
    except Exception as exc:
        raise describe_error(exc, None) from exc
    return [
        ModelSummary(
            repo_id=i.id, downloads=i.downloads or 0, likes=i.likes or 0, last_modified=i.last_modified,
            tags=tuple(i.tags or ()), pipeline_tag=i.pipeline_tag, gated=bool(i.gated),
            num_params=_param_count(i), library_name=i.library_name,
        )
        for i in infos
    ]


def _param_count(info) -> int | None:
    """The Hub's parameter count: from the safetensors headers, else from the GGUF metadata."""
    if info.safetensors is not None:
        return info.safetensors.total
    gguf = getattr(info, "gguf", None)
    return gguf.get("total") if isinstance(gguf, dict) else None


def model_details(repo_id: str, *, revision: str | None = None, token: str | None = None,
                  with_card: bool = True) -> ModelDetails:
    """Card summary, license, gated flag, parameter count and files with sizes of one repo.

    Raises:
        HubError: unknown repo, no access, or no network (``kind`` says which).
    """
    check_online()
    try:
        info = _api(token).model_info(repo_id, revision=revision, files_metadata=True, timeout=20)
    except Exception as exc:
        raise describe_error(exc, repo_id) from exc
    card = info.card_data.to_dict() if info.card_data is not None else {}
    license_ = card.get("license") or next(
        (t.split(":", 1)[1] for t in info.tags or () if t.startswith("license:")), None)
    files = tuple(
        RepoFile(s.rfilename, s.lfs.size if s.lfs is not None else s.size) for s in info.siblings or ()
    )
    summary = ""
    if with_card and any(f.path == "README.md" for f in files):
        try:
            summary = card_summary(fetch_text(repo_id, "README.md", revision=info.sha, token=token))
        except HubError:
            summary = ""  # the card is a nicety: the rest of the details still stand
    st = info.safetensors
    return ModelDetails(
        repo_id=info.id, sha=info.sha, license=license_, gated=bool(info.gated),
        num_params=_param_count(info), params_by_dtype=dict(st.parameters) if st else {},
        files=files, card_summary=summary, tags=tuple(info.tags or ()), pipeline_tag=info.pipeline_tag,
        downloads=info.downloads or 0, likes=info.likes or 0, last_modified=info.last_modified,
    )


def fetch_text(repo_id: str, filename: str, *, revision: str | None = None, token: str | None = None,
               max_bytes: int = 4 << 20) -> str:
    """Read one small file of a repo straight into memory (README, config.json).

    Not through the Hugging Face cache on purpose: browsing a model must not leave
    half-downloaded repos in the cache (the library would list them).

    Raises:
        HubError: as ``model_details``; ``kind="other"`` when the file is larger than ``max_bytes``.
    """
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    check_online()
    url = hf_hub_url(repo_id, filename, revision=revision)
    try:
        response = get_session().get(url, headers=build_hf_headers(token=token), timeout=20)
        hf_raise_for_status(response)
    except Exception as exc:
        raise describe_error(exc, repo_id) from exc
    if len(response.content) > max_bytes:
        raise HubError("other", f"{filename} of {repo_id} is larger than expected ({len(response.content)} bytes)")
    return response.content.decode("utf-8", "replace")


def fetch_config(repo_id: str, *, revision: str | None = None, token: str | None = None) -> dict:
    """The repo's ``config.json`` as a dict (for the fit estimate: layers, heads, head size).

    Raises:
        HubError: no such file / no access / offline, or the file is not a JSON object.
    """
    text = fetch_text(repo_id, "config.json", revision=revision, token=token)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise HubError("other", f"config.json of {repo_id} is not valid JSON ({exc.msg}).") from exc
    if not isinstance(data, dict):
        raise HubError("other", f"config.json of {repo_id} is not a JSON object.")
    return data


def card_summary(markdown: str, max_chars: int = 700) -> str:
    """The first prose paragraphs of a model card: front matter, headings, badges and HTML dropped."""
    text = re.sub(r"\A---\s*\n.*?\n---\s*(\n|\Z)", "", markdown, flags=re.S)
    text = re.sub(r"^```.*?^```[^\n]*$", "", text, flags=re.S | re.M)  # code blocks
    paragraphs: list[str] = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in block.strip().splitlines()]
        lines = [ln for ln in lines if ln and not ln.startswith(("#", "<", "![", "[![", "|", "```"))]
        if not lines:
            continue
        para = " ".join(lines)
        para = re.sub(r"!\[[^\]]*\]\([^)]*\)", "", para)          # images
        para = re.sub(r"\[([^\]]+)\]\([^)]*\)", r"\1", para)      # links -> their text
        para = re.sub(r"[*_`]{1,3}([^*_`]+)[*_`]{1,3}", r"\1", para).strip()
        if para:
            paragraphs.append(para)
        if sum(map(len, paragraphs)) >= max_chars:
            break
    out = "\n\n".join(paragraphs)
    return out if len(out) <= max_chars else out[: max_chars - 1].rstrip() + "…"


# ---------------------------------------------------------------------------- errors


def describe_error(exc: BaseException, repo_id: str | None) -> HubError:
    """Map any exception from a Hub call to a ``HubError`` a user can act on.

    gated -> accept the terms (link) and save a token; 401 -> the token; 404 -> not found;
    ENOSPC -> free disk space; connection problems / offline mode -> check the network.
    """
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RemoteEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    from engine.api import is_connection_error

    if isinstance(exc, HubError):
        return exc
    what = f"'{repo_id}'" if repo_id else "the Hub"
    if isinstance(exc, GatedRepoError):  # before RepositoryNotFoundError: it is a subclass
        url = f"{HUB_SITE}/{repo_id}" if repo_id else HUB_SITE
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status == 403:
            hint = "the saved token's account has not been granted access yet: accept the terms at "
        else:
            hint = "accept its terms while logged in at "
        return HubError("gated", f"{what} is a gated model: {hint}{url}, then save an access token of that "
                        "account (Models page → Hugging Face token) and try again.", url)
    if isinstance(exc, RepositoryNotFoundError):
        return HubError("not_found", f"{what} was not found on the Hub. Check the spelling; if it is a private "
                        "repo, save a token of an account that can see it.")
    if isinstance(exc, RevisionNotFoundError):
        return HubError("not_found", f"{what} has no such revision (branch, tag or commit); pick an existing one.")
    if isinstance(exc, RemoteEntryNotFoundError):
        return HubError("not_found", f"a file of {what} was not found on the Hub (it may have been renamed or "
                        "removed): refresh the model's details and try again.")
    if isinstance(exc, HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status == 401:
            return HubError("unauthorized", "the Hub rejected the access token (401): it may be mistyped, expired "
                            "or revoked. Save a valid token from https://huggingface.co/settings/tokens.")
        if status == 403:
            return HubError("unauthorized", f"the Hub refused access to {what} (403): the token lacks the "
                            "permission. Use a token with read access.")
        if status == 404:
            return HubError("not_found", f"{what} was not found on the Hub (404). Check the name.")
        if status == 429:
            return HubError("other", "the Hub is rate-limiting requests (429): wait a minute and try again, "
                            "or save a token (logged-in users get higher limits).")
        return HubError("other", f"the Hub answered with an error ({status or 'unknown status'}): "
                        f"{_first_line(exc)}. Try again later.")
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return HubError("disk_full", "the disk is full: free some space (for example delete models in the "
                        "Library) and retry the download.")
    if isinstance(exc, (OfflineModeIsEnabled,)) or is_connection_error(exc) or (
            isinstance(exc, LocalEntryNotFoundError)):
        offline = isinstance(exc, OfflineModeIsEnabled)
        why = "offline mode is on (HF_HUB_OFFLINE)" if offline else "the Hub could not be reached"
        todo = "unset HF_HUB_OFFLINE to use the Hub" if offline else "check the network connection (or proxy) and retry"
        return HubError("offline", f"{why}: {todo}.")
    return HubError("other", f"{type(exc).__name__}: {_first_line(exc)}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
