"""The `siglip2-jax` command (`python -m siglip2_jax`): one parser for the commands of `siglip2_jax.commands`.

Building the parser imports no jax, flax, grain or orbax: every command declares its options in a module
that is light to import (`register(commands)`), and its `run` imports the heavy parts when it starts.
So `siglip2-jax --help` and `siglip2-jax COMMAND --help` answer at once (`tests/test_cli.py` checks it).
"""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .commands import COMMANDS, command_module, run_command

DESCRIPTION = """\
SigLIP 2 vision-language encoders in JAX.

commands:
  convert SRC OUT              Hugging Face weights (hub id or local dir) or a big_vision .npz -> a
                               siglip2-jax checkpoint; --verify certifies it against a reference.
  export CKPT OUT              a siglip2-jax checkpoint (converted or fine-tuned) -> a Hugging Face
                               model directory that transformers loads.
  classify [MODEL] IMAGE...    zero-shot classification: sigmoid probability of each --labels entry.
  embed MODEL INPUT OUT        embed a folder / list of images (or --texts captions): sharded over all
                               devices and hosts, resumable after any crash.
  search OUT "query"           rank an embedded collection by a text (or --image) query.
  finetune --model M --data D --out O   fine-tune on image-text pairs with the sigmoid loss (LiT too).
  serve MODEL                  an OpenAI-compatible HTTP server: embeddings of texts and images,
                               zero-shot classification and ranking, with dynamic batching.

MODEL is a siglip2-jax checkpoint directory, a Hugging Face model directory, or a hub id
(default google/siglip2-base-patch16-224; hub ids need a network the first time).

Run `siglip2-jax COMMAND --help` for each command's options.
"""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with one-line errors: `PROG: error: MESSAGE (see PROG --help)`, exit status 2.
    Subcommand parsers inherit it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="siglip2-jax", description=DESCRIPTION,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    for name in COMMANDS:
        command_module(name).register(commands)
    parser.commands = commands  # each command's parser, by name (`main` reports a stray flag with it)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named by the command's parser, whose --help lists the flag that was meant
        parser.commands.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    return run_command(args.command, args)


if __name__ == "__main__":
    sys.exit(main())
