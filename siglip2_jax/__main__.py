"""`python -m siglip2_jax ...` is the `siglip2-jax` command."""

import sys

from .cli import main

sys.exit(main())
