"""Fine-tuning SigLIP 2 on image-text pairs with the sigmoid loss: optax, sharded over a mesh, resumable.

    TrainConfig   every setting; also the `siglip2-jax finetune` flags and the keys of its --config JSON
                  (defined in train_config.py, which imports no jax: fast --help)
    Trainer       the math: which parameters train, AdamW + warmup/cosine + clipping, the jit-compiled step
    finetune      the job: captions file -> batches -> steps -> Orbax checkpoints -> eval -> exported model

Frozen parameters (`freeze`: the image tower for LiT, the text tower, or both towers but their heads) are
not arguments of the differentiated function at all: the backward pass never reaches them, the optimizer
holds no state for them, and they stay bit-identical. Parameters are float32 masters; `dtype` is the
compute dtype of the towers (bfloat16 on TPU/GPU by default). The batch is split over the mesh's "data"
axis and the loss is the ring form (`siglip2_jax.losses`); weights are placed by `siglip2_jax.sharding`,
with `fsdp` also splitting them over "data".
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from . import defaults
from .config import Siglip2Config
from .losses import ring_sigmoid_loss, sigmoid_loss
from .model.build import flat_param_shapes, flatten, model_from_params, nest, stack_layers
from .sharding import DEFAULT_RULES, batch_sharding, make_mesh, param_shardings
# the settings and the CLI flags live apart, importable without jax (fast --help); re-exported here
from .train_config import DTYPES, FREEZE_MODES, TrainConfig, _flag, config_from_args, register  # noqa: F401

FSDP_RULES = {**DEFAULT_RULES, "embed": "data"}
# the learned query, the position tables, norms, biases and the logit scale/bias are not decayed
NO_DECAY = {"scale", "bias", "position", "probe", "logit_scale", "logit_bias"}
HEADS = ("vision/head/", "text/head_kernel", "text/head_bias", "logit_scale", "logit_bias")


# ---- which parameters train, and how ----------------------------------------------------------------
def is_trainable(path: str, freeze: str) -> bool:
    """path: a parameter's "/"-joined name, e.g. "vision/encoder/blocks/mlp/fc1_kernel"."""
    if freeze == "image":
        return not path.startswith("vision/")
    if freeze == "text":
        return not path.startswith("text/")
    if freeze == "towers":
        return path.startswith(HEADS)
    return True


def is_decayed(path: str) -> bool:
    """Weight decay applies to the matrices (kernels, the token table), not to NO_DECAY or any bias."""
    name = path.rsplit("/", 1)[-1]
    return name not in NO_DECAY and not name.endswith("_bias")


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup to `learning_rate` at step `warmup_steps`, then cosine decay to `end_learning_rate` at
    step `steps`. Update k (counting from 1) uses the rate at k: the first update is not wasted on rate 0."""
    warmup = min(cfg.warmup_steps, cfg.steps - 1)
    base = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup, cfg.steps, cfg.end_learning_rate)
    return lambda count: base(count + 1)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    decay_mask = lambda params: nest({p: is_decayed(p) for p in flatten(params)})  # noqa: E731
    adamw = optax.adamw(learning_rate_schedule(cfg), b1=cfg.adam_b1, b2=cfg.adam_b2,
                        weight_decay=cfg.weight_decay, mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw) if cfg.clip_norm > 0 else adamw


def compute_dtype(name: str):
    if name == "auto":
        return defaults.compute_dtype()
    return jnp.dtype(name).type


def batch_loss(model, batch: dict, mesh: Mesh | None = None) -> jax.Array:
    """The sigmoid loss of a batch dict(images=..., token_ids=...) whose row i of each is a pair.
    With a mesh whose "data" axis has several devices, the ring form (no global logits)."""
    image_embeds = model.encode_images(batch["images"])
    text_embeds = model.encode_texts(batch["token_ids"])
    scale, bias = model.logit_scale[...], model.logit_bias[...]
    if mesh is None or mesh.shape["data"] == 1:
        return sigmoid_loss(model.logits(image_embeds, text_embeds))
    return ring_sigmoid_loss(image_embeds, text_embeds, scale, bias, mesh)


# Settings that do not change the compiled step: trainers that differ only in these share one compilation
# (a resumed run, a notebook cell run again).
NOT_IN_STEP = ("model", "data", "out", "seed", "save_every", "keep", "eval_every", "eval_holdout", "eval_data",
               "max_num_patches", "workers", "skip_bad_images")


@dataclasses.dataclass(frozen=True)
class _Compiled:
    optimizer: optax.GradientTransformation
    shardings: dict             # flat: parameter path -> NamedSharding
    place: callable             # flat params -> float32 copies on their shardings
    init: callable              # trainable params -> optimizer state, each moment beside its parameter
    step: callable              # (trainable, opt_state, frozen, batch) -> (trainable, opt_state, metrics)
    embed: callable             # (trainable, frozen, batch) -> (image embeddings, text embeddings)


@functools.lru_cache(maxsize=8)
def _compile(config: Siglip2Config, cfg: TrainConfig, mesh: Mesh) -> _Compiled:
    """The jit-compiled functions of one model, one set of optimizer settings, one mesh."""
    optimizer, dtype = make_optimizer(cfg), compute_dtype(cfg.dtype)
    shardings = flatten(param_shardings(config, mesh, FSDP_RULES if cfg.fsdp else None))
    replicated = NamedSharding(mesh, PartitionSpec())
    shapes = flat_param_shapes(config)
    trainable = nest({p: shapes[p] for p in shapes if is_trainable(p, cfg.freeze)})

    def sharding_of(path, leaf):  # optimizer moments live where their parameter lives; counters replicated
        name = "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
        return shardings[name] if name in shapes and leaf.shape == shapes[name].shape else replicated

    opt_shardings = jax.tree_util.tree_map_with_path(sharding_of, jax.eval_shape(optimizer.init, trainable))
    trainable_shardings = nest({p: shardings[p] for p in flatten(trainable)})

    def model(trainable, frozen):
        return model_from_params(config, nest({**flatten(trainable), **flatten(frozen)}), dtype=dtype)

    def step(trainable, opt_state, frozen, batch):
        loss, grads = jax.value_and_grad(lambda t: batch_loss(model(t, frozen), batch, mesh))(trainable)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        metrics = dict(loss=loss, grad_norm=optax.global_norm(grads))
        return optax.apply_updates(trainable, updates), opt_state, metrics

    def embed(trainable, frozen, batch):
        m = model(trainable, frozen)
        return m.encode_images(batch["images"]), m.encode_texts(batch["token_ids"])

    return _Compiled(
        optimizer, shardings,
        # a jit's outputs never alias its inputs: the step donates the trainer's buffers, never the caller's
        place=jax.jit(lambda flat: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), flat), out_shardings=shardings),
        init=jax.jit(optimizer.init, out_shardings=opt_shardings),
        step=jax.jit(step, donate_argnums=(0, 1), out_shardings=(trainable_shardings, opt_shardings, replicated)),
        embed=jax.jit(embed, out_shardings=replicated))


class Trainer:
    """The parameters (trainable and frozen parts), the optimizer state and the compiled step, on a mesh.

    `trainer.train_step(batch)` runs one step on a host batch (numpy, this process's rows) and returns
    its metrics as device scalars; `trainer.params()` is the whole current params tree. The trainer
    works on float32 copies of `params`.
    """

    def __init__(self, config: Siglip2Config, params: dict, cfg: TrainConfig, mesh: Mesh | None = None):
        if config.vision is None or config.text is None:
            raise ValueError("fine-tuning needs a two-tower checkpoint (image and text)")
        self.config, self.cfg = config, cfg
        self.mesh = mesh if mesh is not None else make_mesh(cfg.model_parallel)
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        self._compiled = _compile(config, dataclasses.replace(cfg, **{k: defaults[k] for k in NOT_IN_STEP}), self.mesh)
        self.schedule = learning_rate_schedule(cfg)
        flat = self._compiled.place(stack_layers(flatten(params)))  # training scans stacked layers
        trainable = {p: v for p, v in flat.items() if is_trainable(p, cfg.freeze)}
        self.trainable, self.frozen = nest(trainable), nest({p: v for p, v in flat.items() if p not in trainable})
        self.opt_state = self._compiled.init(self.trainable)
        self.step = 0

    def put_batch(self, batch: dict):
        """A host batch (this process's rows) as global arrays split over the "data" axis."""
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
            batch_sharding(self.mesh, np.ndim(x)), np.asarray(x)), batch)

    def train_step(self, batch: dict) -> dict:
        self.trainable, self.opt_state, metrics = self._compiled.step(self.trainable, self.opt_state, self.frozen,
                                                                      self.put_batch(batch))
        self.step += 1
        return metrics

    def embed(self, batch: dict) -> tuple[np.ndarray, np.ndarray]:
        """(image embeddings, text embeddings) of a batch with the current parameters, on the host."""
        images, texts = self._compiled.embed(self.trainable, self.frozen, self.put_batch(batch))
        return np.asarray(images), np.asarray(texts)

    def learning_rate(self, step: int | None = None) -> float:
        """The rate of update `step` + 1 (the next one by default)."""
        return float(self.schedule(self.step if step is None else step))

    def params(self) -> dict:
        return nest({**flatten(self.trainable), **flatten(self.frozen)})

    def abstract_state(self) -> dict:
        """What a training checkpoint holds, as shapes and shardings (the restore target)."""
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            dict(params=self.trainable, opt_state=self.opt_state))

    def load_state(self, state: dict, step: int) -> None:
        self.trainable, self.opt_state, self.step = state["params"], state["opt_state"], step


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
    from .data import iterate, make_loader

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


def finetune(cfg: TrainConfig, *, on_step=None, progress: bool = True) -> FinetuneResult:
    """Fine-tune `cfg.model` on `cfg.data`, resuming from `cfg.out`'s last checkpoint if there is one, and
    export OUT/model. `on_step(record)` is called after every step with its metrics (floats).

    Everything is checked (settings, data, model, an OUT of another run) before anything is written to
    OUT. Every step up to the latest checkpoint is in OUT/metrics.jsonl exactly once, also after a kill and
    a resume. In the main thread, SIGINT (Ctrl-C) and SIGTERM stop the run at the end of the current step:
    it is logged and saved, then `Interrupted` (a KeyboardInterrupt) is raised; a second signal stops at
    once, keeping the last checkpoint. Multi-host: call `distributed.initialize` first; every process runs
    the same call."""
    from flax import nnx
    from tqdm.auto import tqdm

    from .pipeline import load
    from .checkpoint import export_hf, save_checkpoint
    from .train_data import PairTransform, SkippedImages, check_batch_size, pair_loader, read_pairs, split_holdout

    cfg.validate()
    out = Path(cfg.out)
    pairs = read_pairs(cfg.data)
    eval_pairs = read_pairs(cfg.eval_data) if cfg.eval_data else []
    if cfg.eval_holdout:
        pairs, held_out = split_holdout(pairs, cfg.eval_holdout, cfg.seed)
        eval_pairs += held_out
    mesh = make_mesh(cfg.model_parallel)
    if cfg.batch_size % mesh.shape["data"]:
        raise ValueError(f"--batch-size {cfg.batch_size} is not a multiple of the {mesh.shape['data']} "
                         f"data-parallel devices")
    check_batch_size(len(pairs), cfg.batch_size)
    _check_same_run(out, cfg)

    pipeline = load(cfg.model, mesh=mesh, max_num_patches=cfg.max_num_patches, image_size=cfg.image_size or None)
    if pipeline.tokenizer is None:
        raise ValueError(f"{cfg.model}: has no tokenizer (tokenizer.model or tokenizer.json)")
    config, assets_dir = pipeline.config, pipeline.assets_dir
    transform = PairTransform.for_model(pipeline)
    trainer = Trainer(config, nnx.to_pure_dict(nnx.state(pipeline.model, nnx.Param)), cfg, mesh)
    del pipeline  # its copy of the weights is no longer needed

    # everything is checked: from here on, OUT is written
    is_main = jax.process_index() == 0
    _write_run_config(out, cfg, is_main)
    checkpoints = TrainCheckpoints(out / "checkpoints", cfg.keep)
    resumed = checkpoints.restore_latest(trainer)
    if is_main:  # the steps after the checkpoint are run (and logged) again
        _trim_metrics(out / "metrics.jsonl", trainer.step)
    workers = resumed["data"]["workers"] if resumed else _worker_count(cfg.workers)
    skipped = SkippedImages(out / "skipped_images.jsonl", len(pairs), cfg.batch_size,
                            jax.process_index()) if cfg.skip_bad_images else None
    batches = iter(pair_loader(pairs, transform, cfg.batch_size, seed=cfg.seed, workers=workers, skipped=skipped))
    if resumed:
        batches.set_state(resumed["data"]["loader"])

    def data_state():
        return {"loader": batches.get_state(), "workers": workers}

    history, evals = [], []
    bar = tqdm(total=cfg.steps, initial=trainer.step, unit="step", disable=not progress or not is_main,
               dynamic_ncols=True, desc="resumed" if trainer.step else "fine-tuning")
    clock = {}

    def write(record):
        if is_main:
            with (out / "metrics.jsonl").open("a") as log:
                log.write(json.dumps(record) + "\n")

    def report(step, metrics):
        record = {"step": step, **{k: float(v) for k, v in metrics.items()},
                  "learning_rate": trainer.learning_rate(step - 1)}
        if not math.isfinite(record["loss"]):
            raise TrainingDiverged(f"the loss became {record['loss']} at step {step} "
                                   f"(try a lower --learning-rate or --clip-norm)")
        now = time.perf_counter()
        clock.setdefault("start", (now, step))  # the first step (compilation) is not timed
        start, first = clock["start"]
        speed = f", {(step - first) * cfg.batch_size / (now - start):.1f} examples/s" if step > first else ""
        history.append(record)
        write(record)
        bar.update(1)
        bar.set_postfix_str(f"loss {record['loss']:.4f}{speed}")
        if on_step is not None:
            on_step(record)

    def run_eval():
        result = {"step": trainer.step, **evaluate(trainer, eval_pairs, transform, cfg.batch_size)}
        evals.append(result)
        write({"eval": result})
        bar.write(f"step {trainer.step}: " + ", ".join(f"{k} {v:.3f}" for k, v in result.items() if k != "step"))

    try:
        with _StopAtStepEnd(bar.write) as stop:
            pending = None  # metrics are read one step late, so the host never waits for the device
            while trainer.step < cfg.steps and not stop.requested:
                metrics = trainer.train_step(next(batches))
                if pending is not None:
                    report(*pending)
                pending = (trainer.step, metrics)
                if trainer.step % cfg.save_every == 0 or stop.requested:
                    report(*pending)  # a checkpointed step is always logged first
                    pending = None
                    checkpoints.save(trainer, data_state())
                if eval_pairs and cfg.eval_every and trainer.step % cfg.eval_every == 0:
                    run_eval()
            if pending is not None:
                report(*pending)
            checkpoints.save(trainer, data_state())
            if stop.requested:
                raise Interrupted(trainer.step, out / "checkpoints")
    finally:
        getattr(batches, "close", lambda: None)()  # stops the workers now, not at garbage collection
        checkpoints.close()
        bar.close()

    if eval_pairs and not (evals and evals[-1]["step"] == trainer.step):
        run_eval()
    exported = out / "model"
    params = _host_params(trainer.params())  # every process takes part: the weights may be split over hosts
    if is_main:
        save_checkpoint(exported, config, params, source=str(cfg.model), assets_from=assets_dir, overwrite=True)
        transform.images.save(exported)  # the settings it was trained with (its image size, its budget)
        if cfg.export_hf:
            export_hf(exported, out / "model-hf", overwrite=True)
    return FinetuneResult(trainer, history, evals, exported)


def _worker_count(workers: int) -> int:
    if workers >= 0:
        return workers
    return defaults.loader_workers()


def _check_same_run(out: Path, cfg: TrainConfig) -> None:
    """A run with a checkpoint in OUT is resumed only with the settings it was started with (else it is not
    the same run). OUT without a checkpoint (a start that failed before its first save) is free."""
    path = out / "finetune_config.json"
    steps = out / "checkpoints"
    if not (path.is_file() and steps.is_dir() and any(p.name.isdigit() for p in steps.iterdir())):
        return
    saved = json.loads(path.read_text())
    for name, value in dataclasses.asdict(cfg).items():
        if name not in RUN_CONTROL and name in saved and saved[name] != value:
            raise ValueError(f"{out}: this run was started with --{_flag(name)} {saved[name]!r}, now "
                             f"{value!r}; resume it with the same settings, or use a new --out")


def _write_run_config(out: Path, cfg: TrainConfig, is_main: bool) -> None:
    """OUT/finetune_config.json: the settings, which `_check_same_run` compares a resumed run with."""
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "finetune_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")


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


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
    except ValueError as err:
        return _fail(err)
    from . import distributed

    try:
        # preemptible machines get SIGTERM: finetune treats it like Ctrl-C (a checkpoint at the end of the step)
        distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
        result = finetune(cfg)
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except Interrupted as stopped:
        print(f"interrupted: step {stopped.step} saved in {stopped.checkpoints}; run the same command to resume",
              file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"interrupted at once: the last checkpoint in {Path(cfg.out) / 'checkpoints'} is kept; run the "
              "same command to resume from it", file=sys.stderr)
        return 130
    except (ValueError, OSError) as err:
        return _fail(err)
    last = result.history[-1]["loss"] if result.history else float("nan")
    hf = f" and {Path(cfg.out) / 'model-hf'} (Hugging Face format)" if cfg.export_hf else ""
    print(f"trained {result.trainer.step} steps (final loss {last:.4f}); exported {result.exported}{hf}")
    return 0


def _fail(err: BaseException) -> int:
    lines = str(err).strip().splitlines() or [type(err).__name__]
    print(f"error: {lines[0]}", file=sys.stderr)
    return 2
