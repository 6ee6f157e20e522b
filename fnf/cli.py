"""The ``fnf`` command: ``fnf train``, ``fnf localize``, ``fnf sample``, ``fnf eval``, ``fnf estimate-memory``,
``fnf export-lora``, ``fnf demo``.

One module per command in fnf/commands/ (its options and its run); this dispatcher imports a command's module only
when that command runs, and turns input errors into one line and exit status 2. Run ``fnf <command> --help`` for
each command's options.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from . import commands
from .commands import COMMANDS
from .commands.common import DESCRIPTION, SPEC_HELP

# What user input can raise (config keys, specs, files, folders, model loading): one line, exit 2.
USER_ERRORS = (ValueError, TypeError, RuntimeError, OSError, ImportError)


# Third-party output a user cannot act on, dropped while a command runs: transformers' note that it uses its PIL
# image processors because torchvision is not installed (same results; fnf needs no torchvision), and its
# per-file "Loading weights" progress bars (the commands say what they load and show their own progress).
THIRD_PARTY_NOISE = {"transformers.utils.import_utils": ("requires torchvision (not installed); falling back",)}


class _DropNoise(logging.Filter):
    def __init__(self, phrases):
        super().__init__()
        self.phrases = phrases

    def filter(self, record) -> bool:
        message = record.getMessage()
        return not any(p in message for p in self.phrases)


def quiet_third_party() -> None:
    """Drop :data:`THIRD_PARTY_NOISE` and transformers' progress bars (also when transformers is imported later)."""
    for name, phrases in THIRD_PARTY_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise(phrases))
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def command_module(name: str):
    """The module of command ``name`` (fnf/commands/), imported now: only the command that runs is loaded."""
    return importlib.import_module(f"{commands.__name__}.{COMMANDS[name][0]}")


def build_parser(names=None) -> argparse.ArgumentParser:
    """The ``fnf`` parser. The options of the commands in ``names`` (default: every command) come from their
    modules; the others are listed with their one-line help only."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="fnf", description=DESCRIPTION, epilog=SPEC_HELP, formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    for name, (_, help_line) in COMMANDS.items():
        p = sub.add_parser(name, help=help_line, formatter_class=fmt)
        if names is None or name in names:
            command_module(name).add_arguments(p)
    return parser


def main(argv=None) -> int:
    """Run ``fnf`` on ``argv`` (default: the process's arguments); returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    name = next((a for a in argv if not a.startswith("-")), None)   # the command; fnf itself has only --help
    try:
        parser = build_parser([name] if name in COMMANDS else [])
        args = parser.parse_args(argv)
        if not args.command:
            parser.print_help()
            return 2
        quiet_third_party()
        return command_module(args.command).run(args)
    except USER_ERRORS as e:
        if os.environ.get("FNF_DEBUG") == "1":
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"fnf {name}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fnf {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
