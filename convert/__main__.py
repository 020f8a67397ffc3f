"""siglip2-jax's conversion program: HF SigLIP / SigLIP 2 weights or a big_vision `.npz` -> a siglip2-jax
checkpoint directory; the same command as `siglip2-jax convert` (`siglip2_jax.commands.convert`).

    python -m siglip2_convert google/siglip2-base-patch16-224 ./b16-224 --verify
    python -m siglip2_convert siglip2_so400m14_384.npz ./so400m14-384 --tokenizer tokenizer.model
"""

from __future__ import annotations

import argparse
import sys

from siglip2_jax.commands import run_command
from siglip2_jax.commands.convert import DESCRIPTION, EPILOG, add_arguments


def build_parser(prog: str = "python -m siglip2_convert") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser


def main(argv=None) -> int:
    return run_command("convert", build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
