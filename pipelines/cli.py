"""The `sora` command: one entry point for every stage of the lifecycle.

    sora data synth --out data/shapes --num-videos 64
    sora data prepare --manifest data/shapes/captions.jsonl --out data/prepared --resolution 32 --frames 8
    sora train --recipe cluster/recipes/smoke-cpu.yaml --data data/prepared --run-dir runs/smoke
    sora generate --model runs/smoke/export --prompt "a red circle moving left" --out clip.mp4
    sora serve --model runs/smoke/export
    sora eval --model runs/smoke/export --prompts prompts.txt
    sora convert --from-diffusers Wan2.1-T2V-1.3B-Diffusers --out exports/wan-1.3b
    sora demo

Each stage registers its own sub-commands (`register(subparsers)` in its `commands` module) so this
file stays a table of contents. Errors a user can fix (`UserError`, config and input errors) print one
line and exit 2; nothing prints a traceback unless SORA_DEBUG=1.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Sub-command modules, imported lazily so `sora --help` does not pay for torch and ray.
COMMAND_MODULES = (
    "pipelines.data.commands",
    "pipelines.train.commands",
    "pipelines.serve.commands",
    "pipelines.evaluate.commands",
    "pipelines.convert",
    "pipelines.demo",
)


class UserError(Exception):
    """Bad input the user can fix; printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sora", description="Sora-style text-to-video on Ray: data, train, generate, serve."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name and (err.name == name or name.startswith(err.name + ".")):
                continue  # stage not built in this checkout
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pipelines import console

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(args, console)
    finally:
        console.stop()  # a command that sent library output to a log (pipelines/console.py) gets the terminal back


def _run(args: argparse.Namespace, console) -> int:
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        log = console.log_path()
        console.error(
            f"sora {args.command}: interrupted"
            + (f"; log: {log}" if log else "")
            + (f"; {args.resume_hint}" if getattr(args, "resume_hint", None) else "")
        )
        return 130
    except Exception as err:  # noqa: BLE001 - the one place that turns errors into a one-line message
        if os.environ.get("SORA_DEBUG") == "1":
            raise
        from sora_model.config import ConfigError

        user_errors = (UserError, ConfigError, FileNotFoundError, ValueError)
        if isinstance(err, user_errors):
            console.error(f"sora {args.command}: error: {err}")
            return 2
        console.error(f"sora {args.command}: failed: {type(err).__name__}: {err} (set SORA_DEBUG=1 for the traceback)")
        import traceback

        # The traceback goes to the log (the terminal has the one line), then the log's tail to the terminal.
        if console.active() is not None:
            traceback.print_exc()
            sys.stderr.flush()
        for line in console.failure_lines():
            console.error(line)
        return 1
    return int(result or 0)


if __name__ == "__main__":
    # Re-import by package name: run as a script this module is `__main__`, and its UserError would not
    # be the `pipelines.cli.UserError` the stages raise.
    from pipelines.cli import main as package_main

    sys.exit(package_main())
