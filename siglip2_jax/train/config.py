"""Fine-tuning settings and the `siglip2-jax finetune` flags, importable without jax.

    TrainConfig       every setting of `siglip2_jax.train.finetune`; also the `siglip2-jax finetune` flags
                      and the keys of its --config JSON file
    register          adds the `finetune` command to the `siglip2-jax` parser (the job runs in run.py)
    config_from_args  defaults, then the --config file, then the flags

Imports no jax, optax or orbax (seconds), and neither does the package's `__init__`: so that
`siglip2-jax --help` and `siglip2-jax finetune --help` answer at once. `siglip2_jax.train` re-exports it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

FREEZE_MODES = ("none", "image", "text", "towers")
DTYPES = ("auto", "float32", "bfloat16")


def _setting(default, help: str):
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: str = _setting("", "model to start from: a siglip2-jax checkpoint dir, a Hugging Face dir or hub id")
    data: str = _setting("", "captions file of the training pairs: .jsonl ({\"image\": ..., \"caption\": ...} "
                             "per line) or .csv (header row: image,caption); image paths relative to it")
    out: str = _setting("", "run directory: checkpoints/, metrics.jsonl, model/ (the exported checkpoint)")
    steps: int = _setting(1000, "optimizer steps in all (the schedule's length)")
    batch_size: int = _setting(32, "global batch size: pairs per step over all devices (a multiple of them)")
    learning_rate: float = _setting(1e-4, "peak learning rate, reached after the warmup")
    end_learning_rate: float = _setting(0.0, "learning rate at the end of the cosine decay")
    warmup_steps: int = _setting(100, "linear warmup from 0 to the peak over this many steps")
    weight_decay: float = _setting(1e-4, "AdamW decoupled weight decay (times the learning rate, as optax); "
                                         "not applied to norms, biases, position tables, probe, logit scale/bias")
    adam_b1: float = _setting(0.9, "AdamW beta1")
    adam_b2: float = _setting(0.999, "AdamW beta2")
    clip_norm: float = _setting(1.0, "clip gradients to this global norm (0: no clipping)")
    freeze: str = _setting("none", "parameters that stay fixed: none; image (LiT: locked image tower); text; "
                                   "towers (train only the heads and the logit scale and bias)")
    dtype: str = _setting("auto", "compute dtype: float32, bfloat16, or auto (float32 on CPU, else bfloat16); "
                                  "parameters stay float32")
    model_parallel: int = _setting(1, "devices per model replica on the mesh's model axis")
    fsdp: bool = _setting(False, "also split weights and optimizer state over the data axis (FSDP)")
    seed: int = _setting(0, "seed of the data order and of the held-out split")
    save_every: int = _setting(500, "save a training checkpoint every N steps (and always at exit)")
    keep: int = _setting(3, "keep the last K training checkpoints")
    eval_every: int = _setting(0, "evaluate retrieval recall@1 on the held-out pairs every N steps (0: at the end only)")
    eval_holdout: int = _setting(0, "hold out N training pairs (chosen by --seed) for evaluation")
    eval_data: str = _setting("", "captions file of evaluation pairs (in addition to --eval-holdout)")
    export_hf: bool = _setting(False, "also export the trained model as a Hugging Face directory, OUT/model-hf "
                                      "(transformers loads it; as `siglip2-jax export`)")
    max_num_patches: int = _setting(256, "NaFlex models: patch budget per image")
    image_size: int = _setting(0, "FixRes models: train at this input size (the position table resized as "
                                  "transformers' interpolate_pos_encoding does); 0: the model's own")
    skip_bad_images: bool = _setting(False, "leave out pairs whose image cannot be decoded (each listed in "
                                            "OUT/skipped_images.jsonl and said once) instead of stopping")
    workers: int = _setting(-1, "image decoding processes (0: decode in this process; -1: 0 on CPU, where the "
                                "cores are the device, else one per core but one, at most 32); a resumed run "
                                "keeps the count it started with")

    def validate(self) -> "TrainConfig":
        for name in ("model", "data", "out"):
            if not getattr(self, name):
                raise ValueError(f"--{name} is required")
        if self.freeze not in FREEZE_MODES:
            raise ValueError(f"--freeze {self.freeze!r}: expected one of {', '.join(FREEZE_MODES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r}: expected float32, bfloat16 or auto")
        for name in ("steps", "batch_size", "save_every", "keep", "model_parallel", "max_num_patches"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{_flag(name)} {getattr(self, name)}: must be at least 1")
        if self.image_size < 0:
            raise ValueError(f"--image-size {self.image_size}: must be 0 (the model's own) or a size in pixels")
        if self.workers < -1:
            raise ValueError(f"--workers {self.workers}: must be -1 (automatic), 0 or more")
        for name in ("learning_rate", "end_learning_rate", "weight_decay", "clip_norm", "warmup_steps",
                     "eval_every", "eval_holdout"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"--{_flag(name)} {getattr(self, name)}: must not be negative")
        return self


# ---- the `siglip2-jax finetune` command --------------------------------------------------------------
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


def _flag(name: str) -> str:
    return name.replace("_", "-")


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
            parser.add_argument(f"--{_flag(field.name)}", action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        else:
            choices = {"freeze": FREEZE_MODES, "dtype": DTYPES}.get(field.name)
            metavar = None if choices else METAVARS.get(field.name, {int: "N", float: "X"}.get(type(default)))
            parser.add_argument(f"--{_flag(field.name)}", type=type(default), default=None, help=help_text,
                                choices=choices, metavar=metavar)
    from ..distributed import add_arguments as add_multi_host_arguments

    add_multi_host_arguments(parser)
    parser.set_defaults(run=_run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults, then the --config file, then the flags given on the command line."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    settings = {}
    if args.config:
        path = Path(args.config)
        try:
            loaded = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"{path}: no such config file") from None
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not a JSON config file ({err})") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a JSON object of settings")
        for key, value in loaded.items():
            name = key.replace("-", "_")
            if name not in fields:
                raise ValueError(f"{path}: unknown setting {key!r} (the keys are the flag names of "
                                 f"`siglip2-jax finetune --help`)")
            settings[name] = _checked(value, fields[name].default, f"{path}: {key}")
    for name in fields:
        if getattr(args, name, None) is not None:
            settings[name] = getattr(args, name)
    return TrainConfig(**settings).validate()


def _checked(value, default, where: str):
    kind = type(default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{where}: expected {kind.__name__}, got {json.dumps(value)}")
    return value


def _run(args: argparse.Namespace) -> int:
    from .run import run  # jax and the training machinery load only when a run starts

    return run(args)
