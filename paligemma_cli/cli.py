"""The `paligemma` command: pure wiring.

Subcommands are plugins found through the `paligemma.commands` entry-point group, so another installed
package can add one. An entry point names either a Typer command function or a `typer.Typer` sub-app.
Nothing here imports torch: `paligemma --help` must be instant.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from importlib.metadata import entry_points
from typing import Annotated, Callable

import typer
import typer.exceptions

from paligemma_cli import __version__
from paligemma_cli.errors import PaliGemmaError, ReportedElsewhere
from paligemma_cli.outputs import why

DEBUG_ENV = "PALIGEMMA_DEBUG"  # set it to see the traceback behind an error (for bug reports)

ENTRY_POINT_GROUP = "paligemma.commands"

app = typer.Typer(
    name="paligemma",
    help="Run, fine-tune and evaluate PaliGemma vision-language models on your own machine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"paligemma {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", help="Print the version and exit.", callback=_print_version, is_eager=True),
    ] = False,
) -> None:
    """Run, fine-tune and evaluate PaliGemma vision-language models on your own machine."""


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print one line to stderr and return the Exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def friendly_errors(command: Callable) -> Callable:
    """Turn every error into one line on stderr and a non-zero exit, never a traceback (unless
    PALIGEMMA_DEBUG is set): what the user can fix says what to do; anything else says it is a bug."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.exceptions.TyperException):
            raise  # the CLI framework's own ways out (`raise typer.Exit(1)` after a message)
        except ReportedElsewhere:  # rank 0 of the torchrun job prints it
            if debugging():
                raise
            raise typer.Exit(1) from None
        except PaliGemmaError as e:
            if debugging():
                raise
            raise fail(str(e)) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except BrokenPipeError:
            # `paligemma caption dir | head` closes stdout early; that is not an error.
            sys.stderr.close()
            raise typer.Exit(0) from None
        except OSError as e:  # a full disk, a read-only place, stdout on /dev/full
            if debugging():
                raise
            where = f" '{e.filename}'" if e.filename else ""
            raise fail(f"cannot read or write{where}: {why(e)}") from None
        except Exception as e:  # a bug: still one line, with the way to see more
            if debugging():
                raise
            text = str(e).strip().splitlines()
            raise fail(f"unexpected {type(e).__name__}{': ' + text[0] if text else ''} "
                       f"(set {DEBUG_ENV}=1 to see the traceback, and please report it)") from None

    return wrapper


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings (ours, Pillow's, torch's) as one `warning:` line on stderr, not Python's two-line form."""
    text = str(message).strip().splitlines()
    typer.echo(f"warning: {text[0] if text else category.__name__}", err=True)


def register_plugins(target: typer.Typer) -> None:
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            obj = ep.load()
        except Exception as e:  # a broken plugin must not take the whole tool down
            typer.echo(f"warning: could not load command {ep.name!r} ({ep.value}): {e}", err=True)
            continue
        if isinstance(obj, typer.Typer):
            target.add_typer(obj, name=ep.name)
        else:
            target.command(ep.name)(friendly_errors(obj))


register_plugins(app)


def main() -> None:
    if not debugging():
        warnings.showwarning = _one_line_warning
    try:
        app()
    finally:
        _flush_stdout()


def _flush_stdout() -> None:
    """Output still buffered at exit (`--json` printed to a full disk) fails here, as one line."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        pass
    except OSError as e:
        typer.echo(f"error: cannot write the output: {why(e)}", err=True)
        sys.stdout = open(os.devnull, "w")  # so the interpreter's own flush at exit says nothing more
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
