"""Streaming line access to raw files (gzip or plain) and the policy for lines that do not parse."""

from __future__ import annotations

import gzip
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from dataset_prep.errors import DatasetPrepError, MalformedLineError

log = logging.getLogger(__name__)

OnError = Literal["skip", "raise"]
_PROGRESS_EVERY = 1 << 14  # lines between progress-bar updates: keeps tqdm off the hot path


@dataclass
class LineErrors:
    """Reports each malformed line as ``file:line: reason`` and either skips it (counted) or raises."""

    on_error: OnError = "skip"
    max_reports_per_file: int = 10
    skipped: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        if self.on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', not {self.on_error!r}")

    def report(self, path: Path, lineno: int, reason: str) -> None:
        message = f"{path}:{lineno}: {reason}"
        if self.on_error == "raise":
            raise MalformedLineError(f"malformed line {message} (use on_error=skip to skip such lines)")
        self.skipped[str(path)] += 1
        if self.skipped[str(path)] <= self.max_reports_per_file:
            log.warning("skipped malformed line %s", message)

    def summarize(self, path: Path) -> None:
        """One closing line per file, so skips beyond the reported ones are still visible."""
        count = self.skipped[str(path)]
        if count > self.max_reports_per_file:
            log.warning("skipped %d malformed lines in %s (first %d shown)", count, path,
                        self.max_reports_per_file)

    @property
    def total(self) -> int:
        return sum(self.skipped.values())


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DatasetPrepError(f"{what} not found: {path}")
    return path


def iter_lines(path: Path, errors: LineErrors, *, desc: str, show_progress: bool = True
               ) -> Iterator[tuple[int, str]]:
    """Yield ``(line number, text)`` for each non-blank line, decoding gzip by its magic bytes.

    Lines are decoded one at a time so a bad byte sequence is reported with its line number instead of
    aborting the whole file. The progress bar counts bytes read from disk (compressed for gzip).
    """
    with open(path, "rb") as raw, tqdm(total=os.path.getsize(path), unit="B", unit_scale=True, desc=desc,
                                        disable=not show_progress, leave=False) as bar:
        is_gzip = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        stream = gzip.GzipFile(fileobj=raw) if is_gzip else raw
        try:
            for lineno, line in enumerate(stream, start=1):
                if lineno % _PROGRESS_EVERY == 0:
                    bar.update(raw.tell() - bar.n)
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as err:
                    errors.report(path, lineno, f"not UTF-8 ({err.reason})")
                    continue
                if text.strip():
                    yield lineno, text
        except (OSError, EOFError) as err:  # truncated or corrupt gzip: nothing after this point is readable
            raise DatasetPrepError(f"{path} is damaged ({err}); download it again") from err
        bar.update(raw.tell() - bar.n)
    errors.summarize(path)
