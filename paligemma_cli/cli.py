"""The `paligemma` command: pure wiring.

Subcommands are plugins found through the `paligemma.commands` entry-point group, so another installed
package can add one. An entry point names either a Typer command function or a `typer.Typer` sub-app.
Nothing here imports torch: `paligemma --help` must be instant.
"""

from __future__ import annotations

import functools
import sys
from importlib.metadata import entry_points
from typing import Annotated, Callable

import typer

from paligemma_cli import __version__
from paligemma_cli.errors import PaliGemmaError

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


def friendly_errors(command: Callable) -> Callable:
    """Turn the errors a user can fix into one line on stderr and exit code 1, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except PaliGemmaError as e:
            raise fail(str(e)) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except BrokenPipeError:
            # `paligemma caption dir | head` closes stdout early; that is not an error.
            sys.stderr.close()
            raise typer.Exit(0) from None

    return wrapper


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
    app()


if __name__ == "__main__":
    main()
