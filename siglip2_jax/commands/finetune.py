"""`siglip2-jax finetune`: one flag per `TrainConfig` setting (and --config FILE), and what the run prints."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..train.config import DTYPES, FREEZE_MODES, TrainConfig, config_from_args, flag_name
from . import add_multi_host_arguments

DESCRIPTION = """\
Fine-tune a SigLIP 2 model on your image-text pairs with the sigmoid loss (AdamW, linear warmup then
cosine decay, gradient clipping), data parallel over all devices, resumable, and export the result as
an inference checkpoint (OUT/model)."""

EPILOG = """\
examples:
  siglip2-jax finetune --model ckpt/b16-224 --data pets/captions.jsonl --out runs/pets
  siglip2-jax finetune --config pets.json --freeze image       LiT: the image tower stays fixed
  siglip2-jax finetune --config pets.json --steps 2000          a flag wins over the file

--config FILE is a JSON object whose keys are the flag names ("batch-size" or "batch_size"):
  {"model": "ckpt/b16-224", "data": "pets/captions.jsonl", "out": "runs/pets", "steps": 500,
   "batch-size": 64, "learning-rate": 3e-5, "freeze": "image", "eval-holdout": 200}

captions file: .jsonl, one {"image": "cats/1.jpg", "caption": "a cat on a sofa"} per line, or .csv with a
header row (image,caption); image paths are relative to the captions file.

resuming: run the same command again. Training continues from the last checkpoint in OUT/checkpoints
with the same batches, and ends with the same parameters as an uninterrupted run. Ctrl-C or SIGTERM
stops at the end of the current step and saves a checkpoint first (a second one stops at once).
Use the exported model like any other: siglip2_jax.load("runs/pets/model"), siglip2-jax classify
runs/pets/model photo.jpg --labels ...

multi-host: run the same command on every host with --coordinator-address, --num-processes and a
distinct --process-id (or the JAX_* variables); the batches do not depend on the number of hosts.

exit status: 0 trained and exported; 1 the loss became NaN or infinite; 2 bad flags, config file, data or
model (one line on stderr naming it); 130 interrupted (a checkpoint was saved: run again to resume).
"""


METAVARS = {"model": "MODEL", "data": "FILE", "eval_data": "FILE", "out": "DIR"}


def register(commands) -> None:
    """Add `finetune` to the `siglip2-jax` subcommands."""
    parser = commands.add_parser("finetune", help="fine-tune on image-text pairs (sigmoid loss, resumable)",
                                 description=DESCRIPTION, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE", help="JSON file of settings (keys: the flag names below)")
    for field in dataclasses.fields(TrainConfig):
        default = field.default
        help_text = f"{field.metadata['help']} (default: {default!r})" if default != "" else field.metadata["help"]
        if isinstance(default, bool):
            parser.add_argument(f"--{flag_name(field.name)}", action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        else:
            choices = {"freeze": FREEZE_MODES, "dtype": DTYPES}.get(field.name)
            metavar = None if choices else METAVARS.get(field.name, {int: "N", float: "X"}.get(type(default)))
            parser.add_argument(f"--{flag_name(field.name)}", type=type(default), default=None, help=help_text,
                                choices=choices, metavar=metavar)
    add_multi_host_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from .. import distributed, train

    settings = config_from_args(args)
    # preemptible machines get SIGTERM: finetune treats it like Ctrl-C (a checkpoint at the end of the step)
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    result = train.finetune(settings)  # the package's name, looked up now: a caller may have replaced it
    hf = f" and {Path(settings.out) / 'model-hf'} (Hugging Face format)" if settings.export_hf else ""
    if result.history:
        print(f"trained {result.trainer.step} steps (final loss {result.history[-1]['loss']:.4f}); "
              f"exported {result.exported}{hf}")
    else:  # OUT had finished already: no step ran, so there is no loss to show
        print(f"already trained {result.trainer.step} steps; exported {result.exported}{hf}")
    return 0


def interrupted(args: argparse.Namespace, error: KeyboardInterrupt) -> str:
    from ..train import Interrupted

    if isinstance(error, Interrupted):
        return (f"interrupted: step {error.step} saved in {error.checkpoints}; run the same command to "
                "resume")
    try:
        out = config_from_args(args).out
    except ValueError:  # stopped while the settings were read: nothing was run
        return "interrupted"
    return (f"interrupted at once: the last checkpoint in {Path(out) / 'checkpoints'} is kept; run the "
            "same command to resume from it")
