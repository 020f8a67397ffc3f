"""The math of fine-tuning: which parameters train, AdamW + warmup/cosine + clipping, the jit-compiled step.

Frozen parameters (`freeze`: the image tower for LiT, the text tower, or both towers but their heads) are
not arguments of the differentiated function at all: the backward pass never reaches them, the optimizer
holds no state for them, and they stay bit-identical. Parameters are float32 masters; `dtype` is the
compute dtype of the towers (bfloat16 on TPU/GPU by default). The batch is split over the mesh's "data"
axis and the loss is the ring form (`siglip2_jax.losses`); weights are placed by `siglip2_jax.sharding`,
with `fsdp` also splitting them over "data".
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .. import defaults
from ..config import Siglip2Config
from ..losses import ring_sigmoid_loss, sigmoid_loss
from ..model.build import flat_param_shapes, model_from_params
from ..params import Layout, flatten, nest, to_layout
from ..sharding import DEFAULT_RULES, batch_sharding, make_mesh, param_shardings
from .config import TrainConfig

FSDP_RULES = {**DEFAULT_RULES, "embed": "data"}
# the learned query, the position tables, norms, biases and the logit scale/bias are not decayed
NO_DECAY = {"scale", "bias", "position", "probe", "logit_scale", "logit_bias"}
HEAD_PARAM_PREFIXES = ("vision/head/", "text/head_kernel", "text/head_bias", "logit_scale", "logit_bias")


# ---- which parameters train, and how ----------------------------------------------------------------
def is_trainable(path: str, freeze: str) -> bool:
    """path: a parameter's "/"-joined name, e.g. "vision/encoder/blocks/mlp/fc1_kernel"."""
    if freeze == "image":
        return not path.startswith("vision/")
    if freeze == "text":
        return not path.startswith("text/")
    if freeze == "towers":
        return path.startswith(HEAD_PARAM_PREFIXES)
    return True


def is_decayed(path: str) -> bool:
    """Weight decay applies to the matrices (kernels, the token table), not to NO_DECAY or any bias."""
    name = path.rsplit("/", 1)[-1]
    return name not in NO_DECAY and not name.endswith("_bias")


def learning_rate_schedule(settings: TrainConfig) -> optax.Schedule:
    """Linear warmup to `learning_rate` at step `warmup_steps`, then cosine decay to `end_learning_rate` at
    step `steps`. Update k (counting from 1) uses the rate at k: the first update is not wasted on rate 0."""
    warmup = min(settings.warmup_steps, settings.steps - 1)
    base = optax.warmup_cosine_decay_schedule(0.0, settings.learning_rate, warmup, settings.steps,
                                              settings.end_learning_rate)
    return lambda count: base(count + 1)


def make_optimizer(settings: TrainConfig) -> optax.GradientTransformation:
    decay_mask = lambda params: nest({p: is_decayed(p) for p in flatten(params)})  # noqa: E731
    adamw = optax.adamw(learning_rate_schedule(settings), b1=settings.adam_b1, b2=settings.adam_b2,
                        weight_decay=settings.weight_decay, mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(settings.clip_norm), adamw) if settings.clip_norm > 0 else adamw


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
def _compile(config: Siglip2Config, settings: TrainConfig, mesh: Mesh) -> _Compiled:
    """The jit-compiled functions of one model, one set of optimizer settings, one mesh."""
    optimizer, dtype = make_optimizer(settings), compute_dtype(settings.dtype)
    shardings = param_shardings(config, mesh, FSDP_RULES if settings.fsdp else None)
    replicated = NamedSharding(mesh, PartitionSpec())
    shapes = flat_param_shapes(config)
    # the trainable part and the optimizer state are nested trees: they are what training checkpoints
    # (Orbax) hold, in the layout those were written with
    trainable = nest({p: shapes[p] for p in shapes if is_trainable(p, settings.freeze)})

    def sharding_of(path, leaf):  # optimizer moments live where their parameter lives; counters replicated
        name = "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
        return shardings[name] if name in shapes and leaf.shape == shapes[name].shape else replicated

    opt_shardings = jax.tree_util.tree_map_with_path(sharding_of, jax.eval_shape(optimizer.init, trainable))
    trainable_shardings = nest({p: shardings[p] for p in flatten(trainable)})

    def model(trainable, frozen):
        return model_from_params(config, {**flatten(trainable), **flatten(frozen)}, dtype=dtype)

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
    its metrics as device scalars; `trainer.params()` is the whole current params (flat, stacked). The
    trainer works on float32 copies of `params` (flat params, either layout: `siglip2_jax.params`).
    """

    def __init__(self, config: Siglip2Config, params: dict, settings: TrainConfig, mesh: Mesh | None = None):
        if config.vision is None or config.text is None:
            raise ValueError("fine-tuning needs a two-tower checkpoint (image and text)")
        self.config, self.settings = config, settings
        self.mesh = mesh if mesh is not None else make_mesh(settings.model_parallel)
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        in_step = dataclasses.replace(settings, **{k: defaults[k] for k in NOT_IN_STEP})
        self._compiled = _compile(config, in_step, self.mesh)
        self.schedule = learning_rate_schedule(settings)
        flat = self._compiled.place(to_layout(dict(params), Layout.STACKED))  # training scans stacked layers
        trainable = {p: v for p, v in flat.items() if is_trainable(p, settings.freeze)}
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
        """The current flat params (`siglip2_jax.params`), stacked, on the mesh."""
        return {**flatten(self.trainable), **flatten(self.frozen)}

    def abstract_state(self) -> dict:
        """What a training checkpoint holds, as shapes and shardings (the restore target)."""
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            dict(params=self.trainable, opt_state=self.opt_state))

    def load_state(self, state: dict, step: int) -> None:
        self.trainable, self.opt_state, self.step = state["params"], state["opt_state"], step
