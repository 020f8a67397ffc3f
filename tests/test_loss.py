"""The sigmoid loss: equal to transformers' `return_loss=True` with gradients equal to torch autograd's
(both towers), and its ring form equal to the all-gather loss on 8 devices without ever building the
global logits."""

from __future__ import annotations

import functools
import shutil

import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from siglip2_jax.checkpoint import load_hf_params
from siglip2_jax.losses import pair_logits, ring_sigmoid_loss, sigmoid_loss
from siglip2_jax.model.build import model_from_params
from siglip2_jax.params import flatten
from siglip2_jax.sharding import make_mesh
from siglip2_jax.train import batch_loss
from reference import convert_reference, make_reference, preset_hf_config, save_reference, scaled_down

LOSS_TOL, GRAD_TOL = 1e-5, 1e-4


@pytest.fixture(scope="module")
def torch_and_ours(tmp_path_factory):
    """A scaled-down B/32@256 in transformers and converted to ours, a batch of 6 pairs, and torch's
    loss and gradients, the gradients mapped to our layout by the converter itself."""
    tmp = tmp_path_factory.mktemp("loss")
    hf = scaled_down(preset_hf_config("siglip2-base-patch32-256"))
    reference = make_reference(hf, seed=3)
    config, params = convert_reference(save_reference(reference, tmp / "hf"), tmp / "ours")

    rng = np.random.default_rng(0)
    pixels = rng.uniform(-1, 1, (6, 256, 256, 3)).astype(np.float32)
    ids = rng.integers(4, hf["text_config"]["vocab_size"], (6, 64)).astype(np.int32)
    ids[0, 7], ids[0, 8:] = 1, 0  # one realistic caption: tokens, EOS, pads
    with torch.no_grad():  # a released model's scale and bias make most pairs saturate; keep gradients alive
        reference.logit_scale.fill_(np.log(10.0))
        reference.logit_bias.fill_(-2.0)
    reference.zero_grad()
    out = reference(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2), input_ids=torch.from_numpy(ids).long(),
                    return_loss=True)
    out.loss.backward()

    # torch's gradients saved as an HF checkpoint: the converter applies the weights' own transforms to them
    grads_dir = tmp / "grads"
    grads_dir.mkdir()
    save_file({name: p.grad.contiguous() for name, p in reference.named_parameters()}, grads_dir / "model.safetensors")
    shutil.copy(tmp / "hf" / "config.json", grads_dir / "config.json")
    _, torch_grads = load_hf_params(grads_dir, config)
    params["logit_scale"] = jnp.asarray(np.log(10.0), jnp.float32)
    params["logit_bias"] = jnp.asarray(-2.0, jnp.float32)
    batch = dict(images=jnp.asarray(pixels), token_ids=jnp.asarray(ids))
    return config, params, batch, float(out.loss.detach()), flatten(torch_grads)


@functools.cache
def loss_and_grads_fn(config):
    return jax.jit(jax.value_and_grad(lambda params, batch: batch_loss(model_from_params(config, params), batch)))


def our_loss_and_grads(config, params, batch):
    return loss_and_grads_fn(config)(params, batch)


def grad_differences(ours: dict, reference: dict) -> dict:
    """Per parameter: max |ours - torch| / max |torch|."""
    ours = flatten(ours)
    assert set(ours) == set(reference)
    return {k: float(np.abs(np.asarray(ours[k]) - reference[k]).max() / np.abs(reference[k]).max()) for k in reference}


def test_loss_and_gradients_equal_transformers_and_torch_autograd(torch_and_ours):
    config, params, batch, torch_loss, torch_grads = torch_and_ours
    loss, grads = our_loss_and_grads(config, params, batch)
    loss_diff = abs(float(loss) - torch_loss) / abs(torch_loss)
    diffs = grad_differences(grads, torch_grads)
    worst = max(diffs, key=diffs.get)
    print(f"\nloss {float(loss):.6f} vs {torch_loss:.6f}: relative difference {loss_diff:.1e}; gradients of "
          f"{len(diffs)} parameters, worst relative difference {diffs[worst]:.1e} ({worst})")
    assert loss_diff <= LOSS_TOL
    assert all(np.abs(torch_grads[k]).max() > 0 for k in ("vision/embed/patch/kernel", "text/token_embed", "logit_bias"))
    assert diffs[worst] <= GRAD_TOL, diffs


def test_comparison_fails_when_one_weight_moves(torch_and_ours):
    config, params, batch, torch_loss, torch_grads = torch_and_ours
    moved = jax.tree.map(lambda x: x, params)
    moved["text/head_kernel"] = params["text/head_kernel"].at[3, 5].add(0.05)  # flat params (siglip2_jax.params)
    loss, grads = our_loss_and_grads(config, moved, batch)
    assert abs(float(loss) - torch_loss) / abs(torch_loss) > LOSS_TOL
    assert max(grad_differences(grads, torch_grads).values()) > GRAD_TOL


def test_square_batch_convention():
    """-mean over rows of the sum over columns; a pair of perfect +-inf logits has zero loss."""
    logits = jnp.array([[2.0, -1.0], [0.5, 3.0]])
    expected = -(np.log(jax.nn.sigmoid(2.0)) + np.log(jax.nn.sigmoid(1.0)) + np.log(jax.nn.sigmoid(-0.5))
                 + np.log(jax.nn.sigmoid(3.0))) / 2
    np.testing.assert_allclose(float(sigmoid_loss(logits)), expected, rtol=1e-6)
    assert float(sigmoid_loss(jnp.array([[50.0, -50.0], [-50.0, 50.0]]))) < 1e-20


# ---- the ring: 8 virtual CPU devices (tests/conftest.py) ---------------------------------------------
def random_embeddings(n, d, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n, d))
    texts = images + rng.normal(size=(n, d))  # matched pairs are closer than the rest
    unit = lambda x: jnp.asarray(x / np.linalg.norm(x, axis=-1, keepdims=True), jnp.float32)  # noqa: E731
    return unit(images), unit(texts), jnp.float32(np.log(10.0)), jnp.float32(-3.0)


def all_gather_loss(images, texts, scale, bias):
    return sigmoid_loss(pair_logits(images, texts, scale, bias))


@pytest.mark.parametrize("model_parallel", [1, 2])
def test_ring_loss_and_gradients_equal_all_gather(model_parallel):
    assert jax.device_count() == 8
    mesh = make_mesh(model_parallel)            # data axis of 8, or 4 x 2
    inputs = random_embeddings(32, 12)
    ring = lambda *a: ring_sigmoid_loss(*a, mesh=mesh)  # noqa: E731
    grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(*inputs)  # noqa: E731
    (ring_loss, ring_grads), (loss, grads) = grad(ring), grad(all_gather_loss)
    print(f"\nmesh {dict(mesh.shape)}: ring loss {float(ring_loss):.7f}, all-gather {float(loss):.7f}; max |grad diff| "
          + " ".join(f"{float(jnp.abs(a - b).max()):.1e}" for a, b in zip(ring_grads, grads)))
    np.testing.assert_allclose(float(ring_loss), float(loss), rtol=1e-6)
    for ours, reference in zip(ring_grads, grads):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), rtol=1e-5, atol=1e-7)


def test_ring_loss_is_the_same_on_2_4_or_8_devices():
    """Normalized by the global batch: the same pairs give the same loss on 2, 4 or 8 devices."""
    inputs = random_embeddings(16, 12, seed=1)
    losses = [float(jax.jit(ring_sigmoid_loss, static_argnames="mesh")(*inputs, mesh=make_mesh(8 // data)))
              for data in (2, 4, 8)]
    np.testing.assert_allclose(losses, float(all_gather_loss(*inputs)), rtol=1e-6)


def shard_map_bodies(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "shard_map":
            yield eqn.params["jaxpr"]
        for sub in jax_core.jaxprs_in_params(eqn.params):
            yield from shard_map_bodies(sub)


def walk(jaxpr):
    """Every equation of a jaxpr and of the jaxprs inside it (loops, calls)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax_core.jaxprs_in_params(eqn.params):
            yield from walk(sub)


def test_each_device_holds_only_local_by_local_logits():
    """Trace the loss and its gradient: inside the per-device program every matmul is a (local x local)
    block (or a (local x d) gradient), no array has a global-batch dimension, texts move by ppermute and
    nothing is all-gathered. The all-gather loss, traced the same way, has the (global x global) logits."""
    global_batch, local, dim = 32, 4, 12
    mesh = make_mesh(1)
    inputs = random_embeddings(global_batch, dim)
    ring = lambda *a: ring_sigmoid_loss(*a, mesh=mesh)  # noqa: E731
    traced = jax.make_jaxpr(jax.value_and_grad(ring, argnums=(0, 1, 2, 3)))(*inputs).jaxpr
    bodies = list(shard_map_bodies(traced))
    assert bodies, "the ring loss should run under shard_map"
    eqns = [e for body in bodies for e in walk(body)]
    primitives = {e.primitive.name for e in eqns}
    matmuls = {tuple(v.aval.shape) for e in eqns if e.primitive.name == "dot_general" for v in e.outvars}
    shapes = {tuple(v.aval.shape) for e in eqns for v in e.outvars if hasattr(v.aval, "shape")}
    print(f"\nper-device matmul outputs: {sorted(matmuls)}; largest array dimension {max(max(s, default=0) for s in shapes)}")
    assert (local, local) in matmuls and matmuls <= {(local, local), (local, dim)}
    assert all(global_batch not in shape for shape in shapes)
    assert "ppermute" in primitives and not primitives & {"all_gather", "all_to_all"}

    gathered = jax.make_jaxpr(all_gather_loss)(*inputs).jaxpr
    assert {tuple(v.aval.shape) for e in walk(gathered) if e.primitive.name == "dot_general" for v in e.outvars} == {(32, 32)}
