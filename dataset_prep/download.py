"""Downloads: resumable raw-file fetches and a concurrent, cached image fetcher that never crashes on a
dead link (the item just gets mask=False)."""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import urlsplit
from urllib.request import Request, urlopen

from tqdm import tqdm

log = logging.getLogger(__name__)

USER_AGENT = "recbole-speeder-dataset-prep/1.0"
_CHUNK = 1 << 16
_PERMANENT = {404, 410}  # statuses that mark a dead link, remembered so it is not retried every run
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp"}


class DownloadError(OSError):
    """A failed download; ``status`` is the HTTP status when the server answered."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def download_file(url: str, dest: Path, *, timeout: float = 60.0, show_progress: bool = True) -> Path:
    """Fetch ``url`` to ``dest`` through ``dest.part``, resuming a partial download with an HTTP Range.

    ``dest`` appears only once complete; an interrupted run leaves ``.part`` for the next one to continue.
    A server that ignores the Range header gets a fresh download.
    """
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": USER_AGENT} | ({"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urlopen(Request(url, headers=headers), timeout=timeout)
    except HTTPError as err:
        if err.code == 416 and offset:  # the part is already whole (or stale): start over once
            part.unlink()
            return download_file(url, dest, timeout=timeout, show_progress=show_progress)
        raise DownloadError(f"{url}: HTTP {err.code} {err.reason}", status=err.code) from None
    except (URLError, OSError) as err:
        raise DownloadError(f"{url}: {getattr(err, 'reason', err)}") from None
    with response:
        if offset and response.status != 206:
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        try:
            with open(part, "ab" if offset else "wb") as out, tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, desc=dest.name,
                disable=not show_progress, leave=False,
            ) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
        except OSError as err:
            raise DownloadError(f"{url}: interrupted ({err}); run again to resume") from None
    if total is not None and part.stat().st_size != total:
        raise DownloadError(f"{url}: got {part.stat().st_size} of {total} bytes; run again to resume")
    os.replace(part, dest)
    return dest


def image_cache_path(url: str, cache_dir: Path) -> Path:
    """A stable file name per URL (its sha1), keeping a known image suffix for readability."""
    suffix = os.path.splitext(urlsplit(url).path)[1].lower()
    return cache_dir / (hashlib.sha1(url.encode("utf-8")).hexdigest() + (suffix if suffix in _IMAGE_SUFFIXES
                                                                         else ".img"))


def _fetch_image(url: str, cache_dir: Path, offline: bool, timeout: float) -> Path | None:
    if not url:
        return None
    path = image_cache_path(url, cache_dir)
    dead = path.with_name(path.name + ".missing")
    if path.is_file():
        return path
    if offline or dead.is_file():
        return None
    try:
        return download_file(url, path, timeout=timeout, show_progress=False)
    except DownloadError as err:
        if err.status in _PERMANENT:
            dead.touch()
        log.debug("image unavailable: %s", err)
        return None


def fetch_images(urls: list[str], cache_dir: Path, *, workers: int = 16, offline: bool = False,
                 timeout: float = 20.0, show_progress: bool = True) -> list[Path | None]:
    """Local paths of the images, in the order of ``urls``; None where there is no URL or it failed.

    Cached files are reused, 404/410 links are remembered, and offline only the cache is used.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        jobs = pool.map(lambda url: _fetch_image(url, cache_dir, offline, timeout), urls)
        paths = list(tqdm(jobs, total=len(urls), desc="images", unit="img", disable=not show_progress))
    wanted = sum(1 for u in urls if u)
    missing = sum(1 for u, p in zip(urls, paths, strict=True) if u and p is None)
    if missing:
        log.warning("%d of %d item images unavailable%s; those items get mask=False", missing, wanted,
                    " (offline: cache only)" if offline else "")
    return paths
