"""Fine-tuning SigLIP 2 on image-text pairs with the sigmoid loss: optax, sharded over a mesh, resumable.

    config.py   TrainConfig: every setting; also the `siglip2-jax finetune` flags and the keys of its
                --config JSON (imports no jax: fast --help)
    trainer.py  Trainer: the math: which parameters train, AdamW + warmup/cosine + clipping, the
                jit-compiled step
    run.py      finetune: the job: captions file -> batches -> steps -> Orbax checkpoints -> eval ->
                exported model

The names below are imported on first use (PEP 562), as in `siglip2_jax/__init__.py`: importing
`siglip2_jax.train.config` (the CLI's parser does) must not import jax through this file.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# public name -> the module of this package that defines it
_EXPORTS = {
    **dict.fromkeys(("DTYPES", "FREEZE_MODES", "TrainConfig", "config_from_args", "register"), "config"),
    **dict.fromkeys(("FSDP_RULES", "HEADS", "NO_DECAY", "NOT_IN_STEP", "Trainer", "batch_loss", "compute_dtype",
                     "is_decayed", "is_trainable", "learning_rate_schedule", "make_optimizer"), "trainer"),
    **dict.fromkeys(("FinetuneResult", "Interrupted", "RUN_CONTROL", "TrainCheckpoints", "TrainingDiverged",
                     "evaluate", "finetune", "retrieval_recall"), "run"),
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .config import DTYPES, FREEZE_MODES, TrainConfig, config_from_args, register
    from .run import (RUN_CONTROL, FinetuneResult, Interrupted, TrainCheckpoints, TrainingDiverged, evaluate,
                      finetune, retrieval_recall)
    from .trainer import (FSDP_RULES, HEADS, NO_DECAY, NOT_IN_STEP, Trainer, batch_loss, compute_dtype, is_decayed,
                          is_trainable, learning_rate_schedule, make_optimizer)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
