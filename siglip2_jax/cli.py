"""The `siglip2-jax` command."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
SigLIP 2 vision-language encoders in JAX.

commands:
  convert SRC OUT   Hugging Face weights (hub id or local dir) -> a siglip2-jax checkpoint; --verify
                    certifies it against transformers.

Run `siglip2-jax COMMAND --help` for each command's options.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="siglip2-jax", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    from siglip2_convert.__main__ import EPILOG, add_arguments, run as run_convert
    convert = commands.add_parser("convert", help="convert Hugging Face weights to a siglip2-jax checkpoint",
                                  description="Convert Hugging Face SigLIP 2 weights to a siglip2-jax checkpoint.",
                                  epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(convert)
    convert.set_defaults(run=run_convert)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
