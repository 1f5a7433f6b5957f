"""How every `python -m` command starts and stops: its output checked first, errors and signals.

Each command (the trainers, the bench, the sweep, the parity suite, the microbench,
`jaxbench.data`) keeps the same promises, kept here once:

* its output place is checked before any work: a file where a folder belongs, a
  folder that already holds this command's results (without `--overwrite`) or a
  place that cannot be written is refused in one line, with nothing made or changed;
* a folder the command made is removed again if it ends (however) with nothing in it;
* bad input is one line on stderr, `error: ...`, and exit 2 (`ValueError`, `OSError`);
* Ctrl-C exits 130 and SIGTERM (a scheduler's limit, `timeout`) exits 143, each with one
  line on stderr and no traceback, after the command has saved what it can.

Exit codes: 0 done, 1 a failure the command reports (a diverged run, a failed check),
2 bad input, 130 Ctrl-C, 143 SIGTERM.

A command adopts it by moving its body into a function of one `Command` argument::

    def main(argv: Sequence[str] | None = None) -> int:
        return run_command(lambda cmd: _main(cmd, argv))

    def _main(cmd: Command, argv: Sequence[str] | None) -> int:
        args = build_parser().parse_args(argv)  # a usage error exits 2 as before
        ...  # check the flags: raise ValueError("--lr must be positive") -> exit 2
        out = cmd.prepare_out(args.out, RESULT_FILES, overwrite=args.overwrite)
        cmd.on_stop = lambda word: f"{word} after epoch 3; partial results in {out}"
        ...  # the work; Ctrl-C and SIGTERM arrive here as KeyboardInterrupt
        return 0

    if __name__ == "__main__":
        sys.exit(main())

* `cmd.prepare_out(path, produces, overwrite=, flag="--out", resume=False)` checks
  and makes a folder (`prepare_output`); call it for each folder flag (`--profile`
  too, with `produces=()`) before the data loads. `cmd.prepare_file(path,
  overwrite=, flag="--out")` does the same for a flag that names one result file.
* `cmd.on_stop(word)` is called once on Ctrl-C (`word` "interrupted") or SIGTERM
  ("terminated"), after the body has unwound, with both signals ignored: it may
  save partial results, and returns the one line to print. Without it the line is
  `{word}; nothing written to {out}` or `{word}; partial results in {out}`.
* `run_command(body, errors={...})` maps other exception types to exit codes (the
  trainers add `{FloatingPointError: 1}`); `SystemExit` passes through unchanged.
  `cmd.inputs_checked()` ends that: after it those exceptions are bugs and keep their
  traceback (the parity suite calls it before its checks run).
* Interrupted commands leave through `os._exit` (see `exit_interrupted`); in a test,
  `run_command(..., hard_exit=False)` returns 130 or 143 instead.
* `Terminated` (a `KeyboardInterrupt`) is the one SIGTERM class: `except KeyboardInterrupt`
  handles both signals, and `isinstance(e, Terminated)` tells them apart (or an
  `except Terminated` placed before it).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM

BAD_INPUT: Mapping[type[BaseException], int] = {ValueError: EXIT_BAD_INPUT, OSError: EXIT_BAD_INPUT}


class OutputError(ValueError):
    """An output place that cannot be used; the message is one line naming the fix."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's time limit, `timeout`, a closing terminal): the command stops
    as on Ctrl-C, saving what it can, and exits 143."""


def raise_terminated(signum: int, frame: Any) -> None:
    """A SIGTERM handler: raise `Terminated` where the main thread runs."""
    raise Terminated


def exit_interrupted(message: str, code: int = EXIT_INTERRUPTED) -> NoReturn:
    """Ctrl-C's end for every command: `message` as one line on stderr, then exit `code`.

    Leaves with `os._exit`, after flushing: Ctrl-C during compilation or a step can
    leave XLA or PyTorch work in flight whose teardown at interpreter exit is not
    safe (XLA:CPU has segfaulted there). Callers write their files first.
    """
    sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)
    os._exit(code)


def one_line(error: BaseException) -> str:
    """`error: <message>` on one line (a multi-line message joined with '; ')."""
    parts = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "error: " + ("; ".join(parts) or type(error).__name__)


# --- output places ----------------------------------------------------------------------------


def prepare_output(
    path: str | os.PathLike[str],
    produces: Sequence[str],
    *,
    overwrite: bool,
    flag: str = "--out",
    resume: bool = False,
) -> Path:
    """Check an output folder before any work starts, and make it.

    Refused: a path that is a file; a folder that already holds any of the files
    this command `produces` (glob patterns), unless `overwrite`, which removes
    exactly those files (and folders, such as old checkpoints) so no old result
    sits beside a new one; a folder that cannot be created or written. Other
    files in the folder are left alone. `resume`: the folder is a stopped run to
    continue, so it must exist with its `config.json`, and its files stay.
    """
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
    existing = (
        sorted({q.name for pattern in produces for q in p.glob(pattern)}) if p.is_dir() else []
    )
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
    """Make the folder (and its parents) and prove a file can be created in it; the error
    names `named` (the file a flag gives, default the folder itself)."""
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


def remove_if_empty(path: str | os.PathLike[str]) -> None:
    """Remove a folder a command made if it is still empty (nothing else is touched)."""
    with contextlib.suppress(OSError):
        Path(path).rmdir()


def _missing_parents(p: Path) -> list[Path]:
    """The folders `p` needs that do not exist yet, deepest first."""
    missing = []
    for q in [p, *p.absolute().parents]:
        if q.exists():
            break
        missing.append(q)
    return missing


# --- the wrapper ------------------------------------------------------------------------------


class Command:
    """What one run of a command prepared: the output places it made, and its stop line."""

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
        self._remember(p)
        return p

    def prepare_file(
        self, path: str | os.PathLike[str], *, overwrite: bool, flag: str = "--out"
    ) -> Path:
        """Check a flag that names one result file: not a folder, not an existing file
        (unless `overwrite`), in a folder that can be written (made if missing)."""
        p = Path(path)
        if p.is_dir():
            raise OutputError(f"{flag} {p} is a folder, not a file; name a file (e.g. {p}/x.json)")
        if p.exists() and not overwrite:
            raise OutputError(
                f"{flag} {p} already exists; pass --overwrite to replace it or choose another file"
            )
        parent = p.parent
        self._made[:0] = _missing_parents(parent)
        check_writable(parent, flag, named=p)
        self.out = self.out or p
        return p

    def inputs_checked(self) -> None:
        """The input is checked and the work starts: from here on an exception of
        `run_command`'s `errors` is a bug, not bad input, and keeps its traceback."""
        self.checking = False

    def _remember(self, p: Path) -> None:
        self.out = self.out or p
        self._fresh[p] = set(os.listdir(p))

    def wrote(self, p: Path) -> bool:
        """Whether anything was added to the prepared place `p` since it was prepared."""
        if p not in self._fresh:
            return p.exists()
        try:
            return bool(set(os.listdir(p)) - self._fresh[p])
        except OSError:
            return False

    def stop_line(self, word: str) -> str:
        """The one line for Ctrl-C or SIGTERM: the command's own, or where results are."""
        if self.on_stop is not None:
            return self.on_stop(word)
        if self.out is None:
            return word
        if self.wrote(self.out):
            return f"{word}; partial results in {self.out}"
        return f"{word}; nothing written to {self.out}"

    def clean_up(self) -> None:
        """Remove the folders this command made that are still empty, deepest first."""
        for p in self._made:
            remove_if_empty(p)


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises `Terminated` while the body runs (main thread only: signals go there).

    A signal's exception raised inside a garbage-collector callback or a `__del__` (JAX
    runs one on every collection) is swallowed by Python ("Exception ignored in ...") and
    the command would go on: the signal is sent again, to land in the body's own code.
    """
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
    """Run a command's body with the promises of this module; returns its exit code.

    `errors`: exception types printed as one line and mapped to an exit code (the
    first match in order); others propagate with their traceback (a bug). On Ctrl-C
    or SIGTERM: `cmd.stop_line` (saving partial results), empty folders removed, the
    line printed, then `os._exit(130 or 143)` (or returned, without `hard_exit`).
    """
    cmd = Command()
    try:
        with _sigterm_raises():
            try:
                code = body(cmd)
            except KeyboardInterrupt as e:
                stopped: KeyboardInterrupt | None = e
            else:
                stopped = None
        if stopped is not None:
            terminated = isinstance(stopped, Terminated)
            word, code = (
                ("terminated", EXIT_TERMINATED) if terminated else ("interrupted", EXIT_INTERRUPTED)
            )
            with _signals_ignored():
                line = cmd.stop_line(word)
                cmd.clean_up()
            if hard_exit:
                exit_interrupted(line, code)
            print(line, file=sys.stderr, flush=True)
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
