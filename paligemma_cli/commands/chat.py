"""`paligemma chat [IMAGE]`: an interactive session of questions about an image, encoded once.

At a terminal it is a small REPL with line editing and history (stdlib `readline`). With stdin piped
it is a filter: each input line is a question, each answer exactly one line on stdout, nothing else on
stdout, so `paligemma chat img.png < questions.txt > answers.txt` pairs line by line.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from paligemma_cli.cli import DEBUG_ENV, debugging
from paligemma_cli.commands.common import write_stdout
from paligemma_cli.errors import PaliGemmaError
from paligemma_cli.options import (
    CompileOpt,
    DeviceOpt,
    DtypeOpt,
    LangOpt,
    MaxTokensOpt,
    ModelOpt,
    QuantizeOpt,
    SeedOpt,
    TemperatureOpt,
    TopKOpt,
    TopPOpt,
)
from paligemma_cli.outputs import atomic_write_text, check_output_file, why

HELP = """\
Type a question about the image and press Enter; it is sent as "answer LANG QUESTION".
  /image PATH         ask about another image
  /prompt RAW         send a raw PaliGemma prefix once, e.g. /prompt caption en, /prompt detect circle
  /set NAME VALUE     temperature, top-p, top-k, max-tokens, seed or lang (none clears top-p/top-k/seed)
  /set                show the current settings
  /save FILE          write the transcript (FILE.jsonl: one JSON object per answer; else text)
  /reset              forget the transcript and the cached image encoding
  /help               this text
  /quit               leave (also Ctrl-D)"""


def history_file() -> Path:
    return Path("~/.cache/paligemma/chat_history").expanduser()


def chat(
    image: Annotated[Optional[str], typer.Argument(help="Image to ask about (any format Pillow reads); change it with /image PATH.")] = None,
    model: ModelOpt = None,
    max_tokens: MaxTokensOpt = 64,
    temperature: TemperatureOpt = 0.0,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    seed: SeedOpt = None,
    lang: LangOpt = "en",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = "none",
    compile: CompileOpt = False,
    exact: Annotated[bool, typer.Option("--exact", help="Re-encode image and question for every question, so answers equal `paligemma ask` (slower).")] = False,
) -> None:
    """Ask questions about an image one after another; the image is encoded once.

    Each line you type is a question, sent as "answer LANG QUESTION"; the answer streams to stdout.
    Lines starting with / are commands: /image PATH, /prompt RAW, /set NAME VALUE, /save FILE, /reset,
    /help, /quit. Piped input gives exactly one answer line per question line and nothing else.

    Examples:

      paligemma chat examples/shapes.png

      paligemma chat photo.jpg --temperature 0.7 --seed 1 --lang de

      paligemma chat examples/shapes.png --exact   # answers equal `paligemma ask`, slower

      printf 'what color is the circle?\\n/prompt caption en\\n' | paligemma chat examples/shapes.png

      paligemma chat examples/shapes.png < questions.txt > answers.txt
    """
    from paligemma_cli.commands.common import load_pipeline, sampling_options, stderr_console
    from paligemma_cli.inference.chat_session import ChatSession
    from paligemma_cli.processing.image import load_image

    if image == "-":
        raise PaliGemmaError("chat reads questions from stdin, so the image must be a file, not -")
    opts = sampling_options(max_tokens, temperature, top_k, top_p, seed)
    picture = load_image(image) if image else None  # fail on a bad image before paying for the model
    console = stderr_console()
    pipe = load_pipeline(model, device, dtype, console, quantize=quantize, compile=compile, fast_layout=True)
    pipe.max_prompt_tokens(opts.max_new_tokens)  # --max-tokens past the model's context: say so now
    session = ChatSession(pipe, opts, exact=exact)
    if compile:
        with console.status("compiling the decoder (once per session)") if console.is_terminal else nullcontext():
            session.warm_up()
    if picture is not None:
        session.set_image(picture, name=image)
    Repl(session, lang, interactive=sys.stdin.isatty(), console=console).run()


class Repl:
    """Reads lines, dispatches slash commands, streams answers. Talks to the user only on stderr."""

    def __init__(self, session, lang: str, interactive: bool, console):
        self.session = session
        self.lang = lang
        self.interactive = interactive
        self.console = console
        self.commands: dict[str, Callable[[str], bool | None]] = {
            "image": self.cmd_image, "prompt": self.cmd_prompt, "set": self.cmd_set, "save": self.cmd_save,
            "reset": self.cmd_reset, "help": self.cmd_help, "quit": self.cmd_quit, "exit": self.cmd_quit,
        }

    # --- the loop -----------------------------------------------------------------------------

    def run(self) -> None:
        if not self.interactive:
            # A line that is not valid UTF-8 is answered with an error, not the end of the session.
            sys.stdin.reconfigure(errors="surrogateescape")
            for line in sys.stdin:
                if not self.handle(line.rstrip("\r\n")):
                    return
            return
        save_history = enable_line_editing()
        image = self.session.image_name or "no image yet (/image PATH)"
        self.info(f"chatting with {self.session.pipeline.folder} about {image}. /help for commands, Ctrl-D to quit.")
        try:
            while True:
                try:
                    line = self.read_line()
                except EOFError:
                    self.info("")
                    return
                except KeyboardInterrupt:  # as in a shell: Ctrl-C drops the line, Ctrl-D leaves
                    self.info("")
                    continue
                try:
                    if not self.handle(line):
                        return
                except KeyboardInterrupt:  # stop this answer, keep the session
                    sys.stdout.write("\n")
                    self.info("(interrupted)")
        finally:
            save_history()

    def read_line(self) -> str:
        # The prompt must not land in a redirected stdout, which holds only answers.
        if sys.stdout.isatty():
            return input("> ")
        sys.stderr.write("> ")
        sys.stderr.flush()
        return input()

    def handle(self, line: str) -> bool:
        """Act on one input line; False ends the session."""
        from paligemma_cli.processing.text import check_text

        line = line.strip()
        if not line:
            return True
        try:
            check_text(line, "the line")
        except PaliGemmaError as e:
            if not line.startswith("/"):
                write_stdout("\n")  # a question still gets its (empty) answer line: lines stay paired
            self.error(str(e))
            return True
        if not line.startswith("/"):
            self.answer(f"answer {self.lang} {line}")
            return True
        name, _, arg = line[1:].partition(" ")
        command = self.commands.get(name.lower())
        if command is None:
            self.error(f"unknown command /{name}; /help lists the commands")
            return True
        try:
            return command(arg.strip()) is not False
        except PaliGemmaError as e:  # a bad slash command costs one line, not the session
            self.error(str(e))
            return True

    def answer(self, prompt: str) -> None:
        """Stream one answer as exactly one stdout line (an empty one if it failed, to keep lines paired)."""
        try:
            for piece in self.session.ask(prompt):
                write_stdout(piece.replace("\n", " "))  # one answer, one line, whatever the model says
        except PaliGemmaError as e:
            write_stdout("\n")
            self.error(str(e))
            return
        except (OSError, KeyboardInterrupt):
            raise
        except Exception as e:  # a bug in one answer must not lose the session
            if debugging():
                raise
            write_stdout("\n")
            self.error(f"unexpected {type(e).__name__}: {e} (set {DEBUG_ENV}=1 to see the traceback)")
            return
        write_stdout("\n")
        s = self.session.last
        if self.interactive:
            self.console.print(f"[dim]{s.new_tokens} tokens · first token {s.ttft_s:.2f}s · "
                               f"{s.tokens_per_s:.1f} tok/s[/]")

    # --- slash commands -----------------------------------------------------------------------

    def cmd_image(self, arg: str) -> None:
        path = arg.strip("'\"")
        if not path:
            raise PaliGemmaError("usage: /image PATH")
        self.session.set_image(path)
        self.info(f"image: {self.session.image_name}")

    def cmd_prompt(self, arg: str) -> None:
        if not arg:
            raise PaliGemmaError("usage: /prompt RAW, e.g. /prompt caption en")
        self.answer(arg)

    def cmd_set(self, arg: str) -> None:
        opts = self.session.opts
        if not arg:
            self.info(f"temperature {opts.temperature} · top-p {opts.top_p} · top-k {opts.top_k} · "
                      f"max-tokens {opts.max_new_tokens} · seed {opts.seed} · lang {self.lang}")
            return
        name, _, value = arg.partition(" ")
        name, value = name.lower().replace("_", "-"), value.strip()
        if not value:
            raise PaliGemmaError(f"usage: /set {name} VALUE")
        if name == "lang":
            self.lang = value
            return
        fields = {"temperature": ("temperature", float, False), "top-p": ("top_p", float, True),
                  "top-k": ("top_k", int, True), "max-tokens": ("max_new_tokens", int, False),
                  "seed": ("seed", int, True)}
        if name not in fields:
            raise PaliGemmaError(f"unknown setting {name!r}; choose from {', '.join(fields)}, lang")
        field, kind, clearable = fields[name]
        if clearable and value.lower() in ("none", "off"):
            parsed = None
        else:
            try:
                parsed = kind(value)
            except ValueError:
                raise PaliGemmaError(f"{name} needs {'an integer' if kind is int else 'a number'}, not {value!r}") from None
        new = dataclasses.replace(opts, **{field: parsed}).validate()  # raises before anything changes
        self.session.opts = new
        self.info(f"{name} = {parsed}")

    def cmd_save(self, arg: str) -> None:
        if not arg:
            raise PaliGemmaError("usage: /save FILE (FILE.jsonl for JSON lines, anything else for text)")
        path = Path(arg.strip("'\"")).expanduser()
        check_output_file(path, [t.image for t in self.session.history if t.image], "/save")
        if path.exists() and not is_transcript(path):
            raise PaliGemmaError(f"'{path}' exists and is not a chat transcript; choose another name")
        turns = self.session.history
        if path.suffix == ".jsonl":
            text = "".join(json.dumps(t.as_dict()) + "\n" for t in turns)
        else:
            text, image = TRANSCRIPT_HEADER, None
            for t in turns:
                if t.image != image:
                    text += f"# image: {t.image}\n"
                    image = t.image
                text += f"> {t.prompt}\n{t.answer}\n\n"
        try:
            atomic_write_text(path, text)
        except OSError as e:
            raise PaliGemmaError(f"cannot write '{path}': {why(e)}") from None
        self.info(f"saved {len(turns)} answer(s) to {path}")

    def cmd_reset(self, arg: str) -> None:
        self.session.reset()
        self.info("transcript cleared")

    def cmd_help(self, arg: str) -> None:
        typer.echo(HELP, err=True)

    def cmd_quit(self, arg: str) -> bool:
        return False

    # --- output -------------------------------------------------------------------------------

    def info(self, message: str) -> None:
        """Chatter for a person at a terminal; scripts get none."""
        if self.interactive:
            typer.echo(message, err=True)

    def error(self, message: str) -> None:
        typer.echo(f"error: {message}", err=True)


TRANSCRIPT_HEADER = "# paligemma chat transcript\n"


def is_transcript(path: Path) -> bool:
    """A file `/save` wrote before (text with its header, or JSON lines of turns): safe to replace."""
    try:
        with open(path, "rb") as f:
            first = f.readline(1 << 16).decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    if path.suffix != ".jsonl":
        return first == TRANSCRIPT_HEADER
    if not first.strip():
        return path.stat().st_size == 0
    try:
        turn = json.loads(first)
    except json.JSONDecodeError:
        return False
    return isinstance(turn, dict) and {"prompt", "answer"} <= turn.keys()


def enable_line_editing() -> Callable[[], None]:
    """Arrow keys, Ctrl-R search and history kept across sessions; returns the function that saves it."""
    try:
        import readline
    except ImportError:  # e.g. Windows without pyreadline: plain input() still works
        return lambda: None
    path = history_file()
    try:
        readline.read_history_file(path)
    except OSError:  # first run, or an unreadable file: start with no history
        pass
    readline.set_history_length(1000)

    def save() -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)
        except OSError:  # history is a convenience; never fail the session over it
            pass

    return save
