"""How every `python -m` command starts and stops: `run_command(lambda cmd: _main(cmd, argv))`.

The body checks and makes its output places first (`cmd.prepare_out`, `cmd.prepare_file`);
a folder it made goes again if left empty. Bad input is one `error: ...` line, exit 2;
Ctrl-C exits 130 and SIGTERM 143 with one line, `cmd.on_stop(word)`'s if set (it runs
once the body has unwound, with both signals ignored, and may save partial results).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM

BAD_INPUT: Mapping[type[BaseException], int] = {ValueError: EXIT_BAD_INPUT, OSError: EXIT_BAD_INPUT}


class OutputError(ValueError):
    """An output place that cannot be used; the message is one line naming the fix."""


class Terminated(KeyboardInterrupt):
    """SIGTERM: stops like Ctrl-C (a KeyboardInterrupt), exit 143."""


def raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated


def one_line(error: BaseException) -> str:
    parts = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "error: " + ("; ".join(parts) or type(error).__name__)


def prepare_output(
    path: str | os.PathLike[str],
    produces: Sequence[str],
    *,
    overwrite: bool,
    flag: str = "--out",
    resume: bool = False,
) -> Path:
    """Check and make an output folder. Refused: a file; a folder holding any of the
    `produces` globs unless `overwrite` (which removes exactly those); an unwritable place.
    `resume`: the folder must hold a run's `config.json`, and its files stay."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputError(f"{flag} {p} is a file, not a folder; choose another path")
    if resume:
        if overwrite:
            raise OutputError(f"{flag} {p}: --resume keeps the run's files; drop --overwrite")
        if not (p / "config.json").is_file():
            raise OutputError(
                f"{flag} {p} holds no run (no config.json); pass the --out folder of a run"
            )
        check_writable(p, flag)
        return p
    existing = sorted({q.name for pattern in produces for q in p.glob(pattern)})  # none: no p
    if existing and not overwrite:
        raise OutputError(
            f"{flag} {p} already holds results ({', '.join(existing)}); pass --overwrite to "
            "replace them or choose another folder"
        )
    check_writable(p, flag)
    for name in existing:
        if (p / name).is_dir() and not (p / name).is_symlink():
            shutil.rmtree(p / name)
        else:
            (p / name).unlink()
    return p


def check_writable(p: Path, flag: str, named: Path | None = None) -> None:
    """Make the folder and prove a file can be created in it; the error names `named`."""
    try:
        if p.exists() and not p.is_dir():  # as `mkdir` says of a file on the way
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(p))
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".write-probe-"):
            pass
    except OSError as e:
        raise OutputError(
            f"{flag} {named or p} is not writable ({e.strerror or e}); choose another place"
        ) from None


def _missing_parents(p: Path) -> list[Path]:
    """The folders `p` needs that do not exist yet, deepest first."""
    return list(itertools.takewhile(lambda q: not q.exists(), [p, *p.absolute().parents]))


class Command:
    """What one run of a command prepared: the folders it made, and its stop line."""

    def __init__(self) -> None:
        self.out: Path | None = None  # the first place prepared: the one the stop line names
        self.on_stop: Callable[[str], str] | None = None
        self.checking = True  # `errors` are bad input until `inputs_checked`
        self._made: list[Path] = []  # folders this command created, deepest first
        self._fresh: dict[Path, set[str]] = {}  # each place's entries once prepared

    def prepare_out(
        self,
        path: str | os.PathLike[str],
        produces: Sequence[str],
        *,
        overwrite: bool,
        flag: str = "--out",
        resume: bool = False,
    ) -> Path:
        """`prepare_output`, remembering the folders it made so an empty one goes again."""
        p = Path(path)
        self._made[:0] = _missing_parents(p)  # before a refusal: a folder it made goes too
        prepare_output(p, produces, overwrite=overwrite, flag=flag, resume=resume)
        self.out = self.out or p
        self._fresh[p] = set(os.listdir(p))
        return p

    def prepare_file(
        self, path: str | os.PathLike[str], *, overwrite: bool, flag: str = "--out"
    ) -> Path:
        """Check a flag naming one result file (not a folder, new unless `overwrite`)."""
        p = Path(path)
        if p.is_dir():
            raise OutputError(f"{flag} {p} is a folder, not a file; name a file (e.g. {p}/x.json)")
        if p.exists() and not overwrite:
            raise OutputError(
                f"{flag} {p} already exists; pass --overwrite to replace it or choose another file"
            )
        self._made[:0] = _missing_parents(p.parent)
        check_writable(p.parent, flag, named=p)
        self.out = self.out or p
        return p

    def inputs_checked(self) -> None:
        """From here on `run_command`'s `errors` are bugs and keep their traceback."""
        self.checking = False

    def stop_line(self, word: str) -> str:
        """The one line for Ctrl-C or SIGTERM: the command's own, or where results are."""
        if self.on_stop is not None:
            return self.on_stop(word)
        if (out := self.out) is None:
            return word
        fresh = self._fresh.get(out)
        try:  # anything added to a prepared folder since; a prepared file: whether it exists
            wrote = out.exists() if fresh is None else bool(set(os.listdir(out)) - fresh)
        except OSError:
            wrote = False
        return f"{word}; {'partial results in' if wrote else 'nothing written to'} {out}"

    def clean_up(self) -> None:
        """Remove the folders this command made that are still empty, deepest first."""
        for p in self._made:
            with contextlib.suppress(OSError):
                p.rmdir()


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises `Terminated` while the body runs (main thread only). A signal's
    exception raised in a `__del__` or GC callback (JAX runs one on every collection) is
    swallowed by Python, so the hook sends the signal again to land in the body's code."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    previous_hook = sys.unraisablehook

    def resend(unraisable: Any) -> None:
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            previous_hook(unraisable)
            return
        sig = signal.SIGTERM if isinstance(unraisable.exc_value, Terminated) else signal.SIGINT
        # from another thread, a moment later: sent from here it would land in this hook
        timer = threading.Timer(0.01, os.kill, (os.getpid(), sig))
        timer.daemon = True
        timer.start()

    sys.unraisablehook = resend
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """A second Ctrl-C or SIGTERM while partial results are saved waits until they are."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run_command(
    body: Callable[[Command], int | None],
    *,
    errors: Mapping[type[BaseException], int] = BAD_INPUT,
    hard_exit: bool = True,
) -> int:
    """Run a command's body; its exit code. `errors` maps exception types to exit codes
    (first match; others are bugs and propagate). Ctrl-C or SIGTERM: the stop line, then
    `os._exit(130 or 143)`, or that code returned without `hard_exit` (tests)."""
    cmd = Command()
    stopped: KeyboardInterrupt | None = None
    try:
        with _sigterm_raises():
            try:
                code = body(cmd)
            except KeyboardInterrupt as e:
                stopped = e
        if stopped is not None:
            terminated = isinstance(stopped, Terminated)
            word = "terminated" if terminated else "interrupted"
            code = EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
            with _signals_ignored():
                line = cmd.stop_line(word)
                cmd.clean_up()
            sys.stdout.flush()
            print(line, file=sys.stderr, flush=True)
            if hard_exit:
                os._exit(code)  # XLA work cut short is unsafe to tear down normally
            return code
        return EXIT_OK if code is None else code
    except tuple(errors) as e:
        if not cmd.checking:
            raise
        code = next(c for t, c in errors.items() if isinstance(e, t))
        print(one_line(e), file=sys.stderr, flush=True)
        return code
    finally:
        cmd.clean_up()
