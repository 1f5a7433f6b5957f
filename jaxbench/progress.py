"""Progress bars that fall back to none when tqdm is missing.

tqdm is a core dependency, but the project also runs from a source tree on a
GPU image that lacks it; a missing progress bar must never stop a run.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any


class _NoBar:
    """The slice of tqdm's interface the project uses, doing nothing."""

    disable = True  # as tqdm's bar when it shows nothing

    def __init__(self, iterable: Iterable[Any] | None = None, **_: Any) -> None:
        self._iterable = iterable if iterable is not None else ()

    def __iter__(self) -> Iterator[Any]:
        return iter(self._iterable)

    def __enter__(self) -> _NoBar:
        return self

    def update(self, *_: Any) -> None:
        """Nothing: the bar's update, close and the end of its `with` block."""

    close = __exit__ = update


def progress_bar(iterable: Iterable[Any] | None = None, **kwargs: Any) -> Any:
    """`tqdm.auto.tqdm(iterable, **kwargs)`, or a silent stand-in without tqdm."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar(iterable, **kwargs)
    return tqdm(iterable, **kwargs)
