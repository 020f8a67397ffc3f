"""The machine's fp32 GEMM limit at the model's own shapes: the best of every matmul library installed.

    python bench/gemm_limit.py                                   # B/16@224, So400m/14@384, NaFlex B/16: batch 8
    python bench/gemm_limit.py --variants b16-224 --batch 8 --reps 3 --libraries xla torch numpy
    python bench/gemm_limit.py --json limit.json                 # for `bench/peers.py --limit limit.json`

Shapes, per tower (M = batch x sequence length tokens, W width, F MLP width, H heads, N sequence, d = W / H):
  proj      (M, W) @ (W, W)      q, k, v and output projections
  mlp_up    (M, W) @ (W, F)
  mlp_down  (M, F) @ (F, W)
  logits    batch*H x (N, d) @ (d, N)
  values    batch*H x (N, N) @ (N, d)
Libraries (--libraries): xla (jax.jit of jnp.matmul; alone, each call pays for a fresh output buffer, so it
reads lower than XLA's dots inside a model, which ran as fast as OpenBLAS's there on 2026-11-30), torch (torch.matmul; oneDNN/MKL), numpy (run in a child
process with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset, which some machines set for old OpenBLAS builds
and which slow a current one; the kernel it then runs is printed from threadpoolctl), ort (ONNX Runtime,
one MatMul node, weights as an initializer as in an exported model, ORT_ENABLE_ALL, intra-op threads =
cores), openvino (the same ONNX graph, CPU plugin, f32 precision hint, threads = cores). Each repetition
runs every library once in a rotating order; a library's figure is its best repetition (a limit, not a
typical time). Per tower it also prints the limit of one layer's GEMM mix (each shape at its best,
weighted by its FLOPs): the figure a tower's GFLOP/s is a share of. Note that on CPU our pipeline runs a big batch as calls of at most
`siglip2_jax.defaults.CPU_TOKENS_PER_CALL` tokens, so --tokens that value gives the shapes ours really runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

LIBRARIES = ("xla", "torch", "numpy", "ort", "openvino")
CORES = os.cpu_count() or 1
OPENBLAS_OVERRIDES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def model_shapes(key: str, batch: int, tokens: int | None) -> list[dict]:
    """[{name, tower, per_layer, batch_dims, m, k, n, weight}] for the image (FixRes or NaFlex) and text towers of a variant."""
    from siglip2_jax.config import Siglip2Config
    from speed import VARIANTS

    config = Siglip2Config.preset(VARIANTS[key])
    shapes = []
    towers = [("image", config.vision, config.vision.num_positions)] if config.vision else []
    towers += [("text", config.text, config.text.max_length)] if config.text else []
    for tower, c, seq in towers:
        m = tokens or batch * seq
        tag = f"{key} {tower}"
        heads = (max(m // seq, 1) * c.num_heads,)
        # per_layer: how often a block runs the shape (q, k, v and the output projection share one)
        shapes += [dict(name=f"{tag} proj", tower=tag, per_layer=4, batch_dims=(), m=m, k=c.width, n=c.width, weight=True),
                   dict(name=f"{tag} mlp_up", tower=tag, per_layer=1, batch_dims=(), m=m, k=c.width, n=c.mlp_dim, weight=True),
                   dict(name=f"{tag} mlp_down", tower=tag, per_layer=1, batch_dims=(), m=m, k=c.mlp_dim, n=c.width,
                        weight=True),
                   dict(name=f"{tag} logits", tower=tag, per_layer=1, batch_dims=heads, m=seq, k=c.head_dim, n=seq,
                        weight=False),
                   dict(name=f"{tag} values", tower=tag, per_layer=1, batch_dims=heads, m=seq, k=seq, n=c.head_dim,
                        weight=False)]
    return shapes


def operands(shape: dict, seed=0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lead = tuple(shape["batch_dims"])
    a = rng.standard_normal(lead + (shape["m"], shape["k"]), dtype=np.float32)
    b = rng.standard_normal(((() if shape["weight"] else lead) + (shape["k"], shape["n"])), dtype=np.float32)
    return a, b


def flops(shape: dict) -> float:
    return 2.0 * float(np.prod(shape["batch_dims"] or (1,))) * shape["m"] * shape["k"] * shape["n"]


def xla_call(a, b):
    import jax
    import jax.numpy as jnp

    f = jax.jit(jnp.matmul)
    da, db = jax.device_put(a), jax.device_put(b)
    return lambda: f(da, db).block_until_ready()


def torch_call(a, b):
    import torch

    torch.set_num_threads(CORES)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)

    def run():
        with torch.inference_mode():
            return torch.matmul(ta, tb)
    return run


def matmul_onnx(a, b, weight: bool, path: Path) -> Path:
    """One MatMul node; a weight operand is an initializer (constant), as in an exported model."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inputs = [helper.make_tensor_value_info("a", TensorProto.FLOAT, list(a.shape))]
    initializers = []
    if weight:
        initializers.append(numpy_helper.from_array(b, "b"))
    else:
        inputs.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, list(b.shape)))
    out = helper.make_tensor_value_info("c", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm", inputs, [out], initializers)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def ort_call(a, b, weight: bool, path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = CORES
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"a": a} if weight else {"a": a, "b": b}
    return lambda: session.run(None, feed)


def openvino_call(a, b, weight: bool, path: Path):
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": CORES, "INFERENCE_PRECISION_HINT": "f32",
                                                          "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    feed = [a] if weight else [a, b]
    return lambda: request.infer(feed)


def best_times(calls: dict, reps: int) -> dict[str, float]:
    """Warm each call once, then `reps` rounds in rotating order; the best time per call."""
    for call in calls.values():
        call()
    best = {k: float("inf") for k in calls}
    order = list(calls)
    for rep in range(reps):
        shift = rep % len(order)
        for k in order[shift:] + order[:shift]:
            t = time.perf_counter()
            calls[k]()
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def numpy_worker(shapes: list[dict], reps: int) -> None:
    """Child process: numpy's matmul on each shape; prints one JSON line (seconds per shape, BLAS info)."""
    from threadpoolctl import threadpool_info

    seconds = []
    for shape in shapes:
        a, b = operands(shape)
        seconds.append(best_times({"numpy": lambda: np.matmul(a, b)}, reps)["numpy"])
    blas = [f"{i.get('internal_api')} {i.get('version')} kernel {i.get('architecture')}, {i.get('num_threads')} threads"
            for i in threadpool_info() if i.get("user_api") == "blas"]
    print(json.dumps({"seconds": seconds, "blas": "; ".join(blas) or "unknown"}))


def numpy_child(shapes: list[dict], reps: int) -> tuple[list[float], str]:
    env = {k: v for k, v in os.environ.items() if k not in OPENBLAS_OVERRIDES}
    was = {k: os.environ[k] for k in OPENBLAS_OVERRIDES if k in os.environ}
    child = subprocess.run([sys.executable, __file__, "--numpy-worker", json.dumps(shapes), "--reps", str(reps)],
                           env=env, capture_output=True, text=True, check=False)
    if child.returncode != 0:
        raise RuntimeError(f"numpy worker failed: {child.stderr.strip().splitlines()[-1:]}")
    result = json.loads(child.stdout.strip().splitlines()[-1])
    note = f"{result['blas']} (unset for it: {', '.join(f'{k}={v}' for k, v in was.items()) or 'nothing was set'})"
    return result["seconds"], note


def measure(shapes: list[dict], libraries: list[str], reps: int) -> list[dict]:
    rows = []
    numpy_seconds = None
    if "numpy" in libraries:
        numpy_seconds, note = numpy_child(shapes, reps)
        print(f"numpy: {note}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for i, shape in enumerate(shapes):
            a, b = operands(shape)
            calls = {}
            path = matmul_onnx(a, b, shape["weight"], Path(tmp) / f"{i}.onnx") if {"ort", "openvino"} & set(libraries) else None
            makers = {"xla": lambda: xla_call(a, b), "torch": lambda: torch_call(a, b),
                      "ort": lambda: ort_call(a, b, shape["weight"], path),
                      "openvino": lambda: openvino_call(a, b, shape["weight"], path)}
            for library in libraries:
                if library != "numpy":
                    calls[library] = makers[library]()
            seconds = best_times(calls, reps)
            if numpy_seconds is not None:
                seconds["numpy"] = numpy_seconds[i]
            gflops = {k: flops(shape) / s / 1e9 for k, s in seconds.items()}
            best = max(gflops, key=gflops.get)
            dims = "x".join(map(str, shape["batch_dims"])) + " x " if shape["batch_dims"] else ""
            row = dict(name=shape["name"], tower=shape["tower"], per_layer=shape["per_layer"], flops=flops(shape), shape=f"{dims}({shape['m']}, {shape['k']}) @ ({shape['k']}, {shape['n']})",
                       gflops=gflops, limit_gflops=gflops[best], limit_library=best)
            rows.append(row)
            figures = "  ".join(f"{k} {gflops[k]:5.0f}" for k in libraries if k in gflops)
            print(f"{row['name']:<28} {row['shape']:<34} {figures}  | limit {gflops[best]:5.0f} ({best})", flush=True)
            del calls
    return rows


def tower_limits(rows: list[dict]) -> dict[str, float]:
    """GFLOP/s of one encoder layer's GEMMs if each ran at its shape's limit: {"b16-224 image": ...}. The
    non-GEMM work (LayerNorm, GELU, softmax, patch embedding, head) is left out, so this bounds a tower's
    achievable figure from above."""
    flop, seconds = {}, {}
    for row in rows:
        work = row["per_layer"] * row["flops"]
        flop[row["tower"]] = flop.get(row["tower"], 0.0) + work
        seconds[row["tower"]] = seconds.get(row["tower"], 0.0) + work / (row["limit_gflops"] * 1e9)
    return {tower: flop[tower] / seconds[tower] / 1e9 for tower in flop}


def main(argv=None):
    from speed import VARIANTS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["b16-224", "so400m14-384", "naflex-b16-256"], choices=VARIANTS)
    parser.add_argument("--batch", type=int, default=8, help="images or texts per call (default 8)")
    parser.add_argument("--tokens", type=int, help="rows M of the projection and MLP GEMMs instead of batch x sequence")
    parser.add_argument("--libraries", nargs="+", default=list(LIBRARIES), choices=LIBRARIES)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--numpy-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.numpy_worker:
        return numpy_worker(json.loads(args.numpy_worker), args.reps)
    if args.batch < 1 or args.reps < 1 or (args.tokens is not None and args.tokens < 1):
        parser.error("--batch, --tokens and --reps must be >= 1")
    for library, module in (("numpy", "threadpoolctl"), ("ort", "onnxruntime"), ("openvino", "openvino"),
                            ("ort", "onnx"), ("openvino", "onnx")):
        if library in args.libraries:
            try:
                __import__(module)
            except ImportError:
                parser.error(f"--libraries {library} needs {module}: pip install -e '.[bench]'")
    shapes = [s for key in dict.fromkeys(args.variants) for s in model_shapes(key, args.batch, args.tokens)]
    from machine import describe
    print(describe(), flush=True)
    print(f"{platform.processor() or platform.machine()}, {CORES} cores; fp32 GFLOP/s, best of {args.reps} "
          f"(batch {args.batch}{f', M = {args.tokens}' if args.tokens else ''})", flush=True)
    rows = measure(shapes, args.libraries, args.reps)
    towers = tower_limits(rows)
    for tower, gflops in towers.items():
        print(f"{tower:<28} limit of one layer's GEMM mix at these shapes: {gflops:5.0f} GFLOP/s", flush=True)
    best = max(rows, key=lambda r: r["limit_gflops"])
    print(f"machine limit: {best['limit_gflops']:.0f} GFLOP/s ({best['limit_library']}, {best['name']})", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch": args.batch, "tokens": args.tokens, "rows": rows, "towers": towers}, f, indent=2)


if __name__ == "__main__":
    main()
