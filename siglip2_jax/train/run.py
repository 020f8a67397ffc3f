"""The fine-tuning job: captions file -> batches -> steps -> Orbax checkpoints -> eval -> exported model.

    TrainCheckpoints  OUT/checkpoints/STEP/: the trainable parameters, the optimizer state, the data position
    evaluate          retrieval recall@1 on held-out pairs
    finetune          the whole run, resumable: checks, resume, steps, evaluation, export
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from .. import defaults
from ..sharding import make_mesh
from .config import TrainConfig, flag_name
from .trainer import FSDP_RULES, Trainer


# ---- training checkpoints ---------------------------------------------------------------------------
class TrainCheckpoints:
    """OUT/checkpoints/STEP/ (an Orbax `CheckpointManager`): the trainable parameters, the optimizer
    state, and the progress (step, data position) as JSON. Frozen parameters are not saved (they never
    change): a resumed run reads them from the model it started from."""

    def __init__(self, directory: Path, keep: int):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)

    def save(self, trainer: Trainer, data: dict) -> None:
        """data: where the data loader is (its state, and what is needed to rebuild it)."""
        if self.manager.latest_step() == trainer.step:
            return
        self.manager.save(trainer.step, force=True, args=ocp.args.Composite(
            params=ocp.args.StandardSave(trainer.trainable), opt_state=ocp.args.StandardSave(trainer.opt_state),
            progress=ocp.args.JsonSave({"step": trainer.step, "data": data})))

    def restore_latest(self, trainer: Trainer) -> dict | None:
        """Load the newest checkpoint into `trainer` (straight onto its shardings); its progress, or None."""
        step = self.manager.latest_step()
        if step is None:
            return None
        target = trainer.abstract_state()
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(target["params"]), opt_state=ocp.args.StandardRestore(target["opt_state"]),
            progress=ocp.args.JsonRestore()))
        trainer.load_state(dict(params=restored.params, opt_state=restored.opt_state), step)
        return restored.progress

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# ---- evaluation -------------------------------------------------------------------------------------
def retrieval_recall(image_embeds: np.ndarray, text_embeds: np.ndarray, captions) -> dict:
    """Recall@1 of image->text and text->image retrieval over pairs (row i of each is one pair). A retrieved
    item counts as correct when its caption equals the query's: small sets often repeat captions."""
    scores = np.asarray(image_embeds) @ np.asarray(text_embeds).T  # the logits rank the same (scale > 0)
    captions = np.asarray(list(captions), dtype=object)
    return {"image_to_text_recall@1": float(np.mean(captions[scores.argmax(1)] == captions)),
            "text_to_image_recall@1": float(np.mean(captions[scores.argmax(0)] == captions))}


def evaluate(trainer: Trainer, pairs, transform, batch_size: int) -> dict:
    """Retrieval recall@1 over `pairs` with the trainer's current parameters. Every process reads all the
    pairs (a held-out set is small) and feeds its rows of each global batch."""
    from ..data import iterate, make_loader

    share = batch_size // jax.process_count()
    first = jax.process_index() * share
    images, texts = [], []
    for batch in iterate(make_loader(pairs, transform, batch_size=batch_size)):
        n = len(batch["token_ids"])
        # pad the last batch with copies of its last pair: one compiled shape for every batch
        rows = jax.tree.map(lambda x: np.concatenate([x, np.repeat(x[-1:], batch_size - n, 0)])[first:first + share], batch)
        image_embeds, text_embeds = trainer.embed(rows)
        images.append(image_embeds[:n])
        texts.append(text_embeds[:n])
    return retrieval_recall(np.concatenate(images), np.concatenate(texts), [p.caption for p in pairs])


# ---- the job ----------------------------------------------------------------------------------------
class TrainingDiverged(RuntimeError):
    pass


@dataclasses.dataclass
class FinetuneResult:
    trainer: Trainer
    history: list[dict]          # one record per step run by this call: step, loss, grad_norm, learning_rate
    evals: list[dict]            # step and retrieval recall@1 of each evaluation
    exported: Path               # the inference checkpoint (siglip2_jax.load reads it)


RUN_CONTROL = {"save_every", "keep", "eval_every", "workers", "export_hf"}  # may change when a run is resumed; nothing else may


def finetune(settings: TrainConfig, *, on_step=None, progress: bool = True) -> FinetuneResult:
    """Fine-tune `settings.model` on `settings.data`, resuming from `settings.out`'s last checkpoint if there is
    one, and export OUT/model. `on_step(record)` is called after every step with its metrics (floats).

    Everything is checked (settings, data, model, an OUT of another run) before anything is written to
    OUT. Every step up to the latest checkpoint is in OUT/metrics.jsonl exactly once, also after a kill and
    a resume. In the main thread, SIGINT (Ctrl-C) and SIGTERM stop the run at the end of the current step:
    it is logged and saved, then `Interrupted` (a KeyboardInterrupt) is raised; a second signal stops at
    once, keeping the last checkpoint. Multi-host: call `distributed.initialize` first; every process runs
    the same call."""
    run = _Run(settings, on_step=on_step, progress=progress)
    run.prepare()
    run.resume()
    run.train()
    return run.export()


class _Run:
    """One `finetune` call, one method per phase; the phases share the trainer, the data and the log.

        prepare  checks everything (settings, data, model, an OUT of another run); writes nothing
        resume   opens OUT: the run's settings, the last checkpoint, the data loader at its position
        train    the steps, their log (OUT/metrics.jsonl, the progress bar), checkpoints, evaluations
        export   the last evaluation, OUT/model (and OUT/model-hf)
    """

    def __init__(self, settings: TrainConfig, *, on_step, progress: bool):
        self.settings, self.on_step, self.progress = settings, on_step, progress
        self.out = Path(settings.out)
        self.history, self.evals = [], []
        self.clock = {}

    def prepare(self) -> None:
        from ..model_source import ModelSource
        from ..params import Layout
        from ..sharding import param_shardings
        from ..train_data import PairTransform, check_batch_size, read_pairs, split_holdout

        settings = self.settings
        settings.validate()
        self.pairs = read_pairs(settings.data)
        self.eval_pairs = read_pairs(settings.eval_data) if settings.eval_data else []
        if settings.eval_holdout:
            self.pairs, held_out = split_holdout(self.pairs, settings.eval_holdout, settings.seed)
            self.eval_pairs += held_out
        mesh = make_mesh(settings.model_parallel)
        if settings.batch_size % mesh.shape["data"]:
            raise ValueError(f"--batch-size {settings.batch_size} is not a multiple of the {mesh.shape['data']} "
                             f"data-parallel devices")
        check_batch_size(len(self.pairs), settings.batch_size)
        _check_same_run(self.out, settings)

        source, image_size = ModelSource(settings.model), settings.image_size or None
        naflex = source.config.vision is not None and source.config.vision.naflex   # the budget has a default
        images = source.preprocessor(max_num_patches=settings.max_num_patches if naflex else None, image_size=image_size)
        if source.tokenizer is None:
            raise ValueError(f"{settings.model}: has no tokenizer (tokenizer.model or tokenizer.json)")
        self.config, self.assets_dir = source.config_at(image_size), source.directory
        self.transform = PairTransform(images, source.tokenizer, self.config.text.max_length)
        # stacked, as training scans them, and placed as the trainer shards them: no inference model
        shardings = param_shardings(source.config, mesh, FSDP_RULES if settings.fsdp else None)
        self.trainer = Trainer(self.config, source.params(Layout.STACKED, shardings, image_size=image_size), settings,
                               mesh)

    def resume(self) -> None:
        from ..train_data import SkippedImages, pair_loader

        # everything is checked: from here on, OUT is written
        settings, out, trainer = self.settings, self.out, self.trainer
        self.is_main = jax.process_index() == 0
        _write_run_config(out, settings, self.is_main)
        self.checkpoints = TrainCheckpoints(out / "checkpoints", settings.keep)
        resumed = self.checkpoints.restore_latest(trainer)
        if self.is_main:  # the steps after the checkpoint are run (and logged) again
            _trim_metrics(out / "metrics.jsonl", trainer.step)
        self.workers = resumed["data"]["workers"] if resumed else _worker_count(settings.workers)
        skipped = SkippedImages(out / "skipped_images.jsonl", len(self.pairs), settings.batch_size,
                                jax.process_index()) if settings.skip_bad_images else None
        self.batches = iter(pair_loader(self.pairs, self.transform, settings.batch_size, seed=settings.seed,
                                        workers=self.workers, skipped=skipped))
        if resumed:
            self.batches.set_state(resumed["data"]["loader"])

    def train(self) -> None:
        from tqdm.auto import tqdm

        settings, trainer, checkpoints = self.settings, self.trainer, self.checkpoints
        self.bar = tqdm(total=settings.steps, initial=trainer.step, unit="step",
                        disable=not self.progress or not self.is_main, dynamic_ncols=True,
                        desc="resumed" if trainer.step else "fine-tuning")
        try:
            with _StopAtStepEnd(self.bar.write) as stop:
                pending = None  # metrics are read one step late, so the host never waits for the device
                while trainer.step < settings.steps and not stop.requested:
                    metrics = trainer.train_step(next(self.batches))
                    if pending is not None:
                        self._report(*pending)
                    pending = (trainer.step, metrics)
                    if trainer.step % settings.save_every == 0 or stop.requested:
                        self._report(*pending)  # a checkpointed step is always logged first
                        pending = None
                        checkpoints.save(trainer, self._data_state())
                    if self.eval_pairs and settings.eval_every and trainer.step % settings.eval_every == 0:
                        self._evaluate()
                if pending is not None:
                    self._report(*pending)
                checkpoints.save(trainer, self._data_state())
                if stop.requested:
                    raise Interrupted(trainer.step, self.out / "checkpoints")
        finally:
            getattr(self.batches, "close", lambda: None)()  # stops the workers now, not at garbage collection
            checkpoints.close()
            self.bar.close()

    def export(self) -> FinetuneResult:
        from ..checkpoint import export_hf, save_checkpoint

        settings, out, trainer = self.settings, self.out, self.trainer
        if self.eval_pairs and not (self.evals and self.evals[-1]["step"] == trainer.step):
            self._evaluate()
        exported = out / "model"
        params = _host_params(trainer.params())  # every process takes part: the weights may be split over hosts
        if self.is_main:
            save_checkpoint(exported, self.config, params, source=str(settings.model), assets_from=self.assets_dir,
                            overwrite=True)
            self.transform.images.save(exported)  # the settings it was trained with (its image size, its budget)
            if settings.export_hf:
                export_hf(exported, out / "model-hf", overwrite=True)
        return FinetuneResult(trainer, self.history, self.evals, exported)

    def _data_state(self) -> dict:
        return {"loader": self.batches.get_state(), "workers": self.workers}

    def _write(self, record: dict) -> None:
        if self.is_main:
            with (self.out / "metrics.jsonl").open("a") as log:
                log.write(json.dumps(record) + "\n")

    def _report(self, step: int, metrics: dict) -> None:
        record = {"step": step, **{k: float(v) for k, v in metrics.items()},
                  "learning_rate": self.trainer.learning_rate(step - 1)}
        if not math.isfinite(record["loss"]):
            raise TrainingDiverged(f"the loss became {record['loss']} at step {step} "
                                   f"(try a lower --learning-rate or --clip-norm)")
        now = time.perf_counter()
        self.clock.setdefault("start", (now, step))  # the first step (compilation) is not timed
        start, first = self.clock["start"]
        speed = f", {(step - first) * self.settings.batch_size / (now - start):.1f} examples/s" if step > first else ""
        self.history.append(record)
        self._write(record)
        self.bar.update(1)
        self.bar.set_postfix_str(f"loss {record['loss']:.4f}{speed}")
        if self.on_step is not None:
            self.on_step(record)

    def _evaluate(self) -> None:
        trainer = self.trainer
        result = {"step": trainer.step, **evaluate(trainer, self.eval_pairs, self.transform, self.settings.batch_size)}
        self.evals.append(result)
        self._write({"eval": result})
        self.bar.write(f"step {trainer.step}: " + ", ".join(f"{k} {v:.3f}" for k, v in result.items() if k != "step"))


def _worker_count(workers: int) -> int:
    if workers >= 0:
        return workers
    return defaults.loader_workers()


def _check_same_run(out: Path, settings: TrainConfig) -> None:
    """A run with a checkpoint in OUT is resumed only with the settings it was started with (else it is not
    the same run). OUT without a checkpoint (a start that failed before its first save) is free."""
    path = out / "finetune_config.json"
    steps = out / "checkpoints"
    if not (path.is_file() and steps.is_dir() and any(p.name.isdigit() for p in steps.iterdir())):
        return
    saved = json.loads(path.read_text())
    for name, value in dataclasses.asdict(settings).items():
        if name not in RUN_CONTROL and name in saved and saved[name] != value:
            raise ValueError(f"{out}: this run was started with --{flag_name(name)} {saved[name]!r}, now "
                             f"{value!r}; resume it with the same settings, or use a new --out")


def _write_run_config(out: Path, settings: TrainConfig, is_main: bool) -> None:
    """OUT/finetune_config.json: the settings, which `_check_same_run` compares a resumed run with."""
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "finetune_config.json").write_text(json.dumps(dataclasses.asdict(settings), indent=2) + "\n")


def _trim_metrics(path: Path, step: int) -> None:
    """Drops the records of steps after `step` (the checkpoint a run resumes from): they are run again and
    logged again. Written under a temporary name, then renamed."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and _record_step(json.loads(line)) <= step]
    if len(kept) != len(lines):
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text("".join(kept))
        temporary.replace(path)


def _record_step(record: dict) -> int:
    return record["step"] if "step" in record else record["eval"]["step"]


def _host_params(params: dict) -> dict:
    """The params tree as numpy arrays on every process (gathered when they are split over processes)."""
    if jax.process_count() == 1:
        return jax.device_get(params)
    from jax.experimental import multihost_utils

    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), params)


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM at the end of a step, saved: run it again to resume."""

    def __init__(self, step: int, checkpoints: Path):
        super().__init__(step, checkpoints)
        self.step, self.checkpoints = step, checkpoints


class _StopAtStepEnd:
    """Within `with`: SIGINT and SIGTERM set `requested` (the loop stops at the end of its step, which keeps
    the parameters, the optimizer state, the step count and the data position in step with each other); a
    second signal raises KeyboardInterrupt at once. Only the main thread can handle signals: elsewhere
    this does nothing."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self, say):
        self.say, self.requested, self.previous = say, False, {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.say("stopping at the end of this step to save a checkpoint (signal again to stop at once, "
                 "unsaved)")

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                number = getattr(signal, name)
                self.previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc):
        import signal

        for number, handler in self.previous.items():
            signal.signal(number, handler)
        return False
