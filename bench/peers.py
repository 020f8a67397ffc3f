"""Ours vs the CPU runtimes people embed with: same weights, same inputs, one process, alternating rounds.

    python bench/peers.py                                      # every workload and runtime (long: ~1 h on 2 cores)
    python bench/peers.py --variants b16-224 --kinds image --batches 1 --reps 2 --runtimes ours sdpa ort ort-int8 openvino
    pip install -e ".[bench]"                                  # onnx, onnxruntime, onnxscript, openvino
    python bench/gemm_limit.py --json limit.json && python bench/peers.py --limit limit.json   # GFLOP/s as a share of it

Runtimes (--runtimes):
  ours      `Siglip2Pipeline.embed_preprocessed`, as bench/speed.py times it
  ours-bf16 the same with `load(..., dtype=bfloat16)`: bf16 matmul inputs, float32 accumulation
  eager     transformers, attn_implementation="eager"
  sdpa      transformers, attn_implementation="sdpa"
  compile   transformers sdpa under `torch.compile` (inductor; compiling takes minutes on 2 cores)
  ort       ONNX Runtime fp32 on the tower exported from the same transformers model (torch.onnx.export,
            dynamic batch), ORT_ENABLE_ALL graph optimizations, intra-op threads = cores
  ort-int8  the same ONNX after `onnxruntime.quantization.quantize_dynamic` (int8 weights, dynamic int8
            activations), same session options
  openvino  OpenVINO on the same fp32 ONNX, CPU plugin, INFERENCE_PRECISION_HINT=f32, threads = cores

Weights are random, full size, built from configs/ by bench/speed.py's `reference_model`, then (by default)
redrawn at trained magnitude with tests/reference.py's `trained_size_` (the default init's tiny weights make
every runtime agree and hide errors; --weights init keeps speed.py's weights). Before a runtime is timed its
L2-normalized embeddings of the timed inputs are compared with transformers eager in fp32: fp32 runtimes
must agree within --atol (max |difference|), ours-bf16 and ort-int8 report their minimum cosine instead. A runtime that fails
its check, or cannot run a workload (the ONNX export of NaFlex towers, for one), is listed with the reason
and not timed. Each repetition runs every runtime once, in an order that rotates between repetitions, so
load from other processes hits all alike; the table gives the median. GFLOP/s count the model's FLOPs (bench/speed.py's `model_flops`) for every
runtime, bf16 and int8 included, as a share of XLA's 2048^2 matmul or, with --limit, of bench/gemm_limit.py's
fp32 limit for that tower.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import torch
import transformers

import siglip2_jax
from siglip2_jax.images import NaFlexBatch
from machine import describe, matmul_peak_gflops
from speed import VARIANTS, inputs, model_flops, reference_model


def _test_reference():
    """tests/reference.py, loaded from its file: putting the repository on sys.path would shadow an installed
    siglip2_jax (and send decoding workers to the source tree)."""
    path = Path(__file__).resolve().parents[1] / "tests" / "reference.py"
    spec = importlib.util.spec_from_file_location("siglip2_jax_test_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


trained_size_ = _test_reference().trained_size_

RUNTIMES = ("ours", "ours-bf16", "eager", "sdpa", "compile", "ort", "ort-int8", "openvino")
REDUCED = ("ours-bf16", "ort-int8")   # reduced precision: reported by cosine, not held to --atol
ONNX_RUNTIMES = ("ort", "ort-int8", "openvino")
CORES = os.cpu_count() or 1


def normalized(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def cosine(a, b) -> float:
    """The smallest cosine between matching rows of two (n, D) embedding arrays."""
    a, b = normalized(a), normalized(b)
    return float(np.min(np.sum(a * b, -1)))


def pooled(output) -> torch.Tensor:
    """transformers 5 returns the tower's output object from get_*_features; the embedding is its pooler_output."""
    return output.pooler_output if hasattr(output, "pooler_output") else output


class Tower(torch.nn.Module):
    """One tower of a transformers Siglip(2)Model as a module of plain tensors in, embedding out (for export
    and torch.compile)."""

    def __init__(self, model, kind: str, naflex: bool):
        super().__init__()
        self.model, self.kind, self.naflex = model, kind, naflex

    def forward(self, *args):
        if self.kind == "text":
            return pooled(self.model.get_text_features(input_ids=args[0]))
        if self.naflex:
            patches, mask, shapes = args
            return pooled(self.model.get_image_features(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes))
        return pooled(self.model.get_image_features(pixel_values=args[0]))


def torch_args(kind: str, x) -> tuple:
    """Our host inputs -> the tensors transformers takes (NCHW pixels, int64 ids and shapes)."""
    if kind == "text":
        return (torch.from_numpy(x).long(),)
    if isinstance(x, NaFlexBatch):
        return (torch.from_numpy(x.patches), torch.from_numpy(x.mask), torch.from_numpy(x.spatial_shapes).long())
    return (torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(),)


def export_onnx(tower: Tower, example: tuple, path: Path) -> None:
    """The tower as ONNX with a dynamic batch axis; weights as external data (So400m's towers pass 2 GB)."""
    names = ["input_ids"] if tower.kind == "text" else (["pixel_values", "pixel_attention_mask", "spatial_shapes"]
                                                       if tower.naflex else ["pixel_values"])
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.onnx.export(tower, example, input_names=names, output_names=["pooled_embedding"], dynamo=True,
                                dynamic_shapes=(tuple({0: batch} for _ in example),), optimize=True, verbose=False)
    program.save(str(path), external_data=True)


def onnx_feed(kind: str, x) -> list[np.ndarray]:
    return [t.numpy() for t in torch_args(kind, x)]


def ort_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = CORES
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return lambda feed: session.run(None, dict(zip(names, feed)))[0]


def ort_int8_session(path: Path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = path.with_name(path.stem + "-int8.onnx")
    quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8, use_external_data_format=True)
    return ort_session(out)


def openvino_session(path: Path):
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": CORES,
                                                          "INFERENCE_PRECISION_HINT": "f32",
                                                          "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    return lambda feed: request.infer(feed)[compiled.output(0)].copy()


def first_line(error: BaseException) -> str:
    """The line of an error that says what went wrong (the exporter's own summary where it gives one)."""
    lines = [line for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    if "## Exception summary" in lines[:-1]:
        summary = lines[lines.index("## Exception summary") + 1]
        return re.sub(r"<class '(?:\w+\.)*(\w+)'>", r"\1", summary)[:120]
    return f"{type(error).__name__}: {lines[0]}"[:120]


class Runner:
    """One workload's callables per runtime; `skip` holds the runtimes that cannot run it, with the reason."""

    def __init__(self):
        self.calls, self.skip, self.check = {}, {}, {}


def build_onnx_runtimes(tower: Tower, example: tuple, directory: Path, wanted: list[str]) -> tuple[dict, dict]:
    """Export once per tower, then one session per ONNX runtime that is wanted: ({runtime: run(feed)}, {runtime: why not})."""
    sessions, skip = {}, {}
    path = directory / f"{tower.kind}.onnx"
    try:
        t = time.perf_counter()
        export_onnx(tower, example, path)
        print(f"  exported the {tower.kind} tower to ONNX in {time.perf_counter() - t:.0f} s", flush=True)
    except Exception as error:  # noqa: BLE001 - any exporter failure means the ONNX runtimes cannot run this tower
        return {}, {r: f"ONNX export failed: {first_line(error)}" for r in wanted}
    gc.collect()   # the exporter's copy of the weights
    # int8 first: quantize_dynamic holds another copy of the fp32 graph while it runs, best before the other sessions
    for runtime, make in (("ort-int8", ort_int8_session), ("ort", ort_session), ("openvino", openvino_session)):
        if runtime in wanted:
            try:
                sessions[runtime] = make(path)
            except Exception as error:  # noqa: BLE001
                skip[runtime] = f"{runtime} failed to load the ONNX: {first_line(error)}"
    return sessions, skip


def bench_variant(key: str, kinds: list[str], batches: list[int], runtimes: list[str], reps: int, atol: float,
                  weights: str, peak: float, limits: dict, pause: float) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        directory = Path(tmp)
        references = reference_model(VARIANTS[key], str(directory / "hf"), torch.float32)
        eager = references["eager"]
        if weights == "trained":
            trained_size_(eager)
            eager.save_pretrained(str(directory / "hf"))
        # sdpa shares eager's tensors: one copy of the weights in memory, identical on both
        references["sdpa"].load_state_dict(eager.state_dict(), assign=True)
        ours = siglip2_jax.load(str(directory / "hf"), dtype=jax.numpy.float32)
        ours_bf16 = siglip2_jax.load(str(directory / "hf"), dtype=jax.numpy.bfloat16) if "ours-bf16" in runtimes else None
        naflex = ours.config.vision is not None and ours.config.vision.naflex
        for kind in kinds:
            towers = {impl: Tower(m, kind, naflex).eval() for impl, m in references.items()}
            sample, ids = inputs(ours.config, 2, seed=1)   # batch 2: torch.export specializes a dimension of size 1
            example = torch_args(kind, ids if kind == "text" else sample)
            sessions, skip = {}, {}
            wanted = [r for r in runtimes if r in ONNX_RUNTIMES]
            if wanted:
                with torch.no_grad():
                    sessions, skip = build_onnx_runtimes(towers["eager"], example, directory, wanted)
            compiled = torch.compile(towers["sdpa"]) if "compile" in runtimes else None
            for batch in batches:
                images, ids = inputs(ours.config, batch)
                x = ids if kind == "text" else images
                args, feed = torch_args(kind, x), onnx_feed(kind, x)
                calls = {
                    # as bench/speed.py times it: host arrays in, embeddings on the device (padded batch) out
                    "ours": lambda x=x: jax.block_until_ready(ours.embed_preprocessed(x, kind).device_array),
                    "ours-bf16": lambda x=x: jax.block_until_ready(ours_bf16.embed_preprocessed(x, kind).device_array),
                    "eager": lambda a=args: towers["eager"](*a).numpy(),
                    "sdpa": lambda a=args: towers["sdpa"](*a).numpy(),
                    "compile": lambda a=args: compiled(*a).numpy(),
                    **{r: (lambda f=feed, s=s: s(f)) for r, s in sessions.items()},
                }
                truth = normalized(calls["eager"]())
                timed_calls, notes = {}, {}
                for runtime in runtimes:
                    if runtime in skip:
                        notes[runtime] = skip[runtime]
                        continue
                    try:
                        t = time.perf_counter()
                        out = normalized(np.asarray(calls[runtime]())[:batch])   # also the warm-up (and compilation)
                        warm = time.perf_counter() - t
                    except Exception as error:  # noqa: BLE001 - a runtime that fails on a workload is reported, not fatal
                        notes[runtime] = f"failed: {first_line(error)}"
                        continue
                    if runtime in REDUCED:
                        notes[runtime] = f"cos min {np.min(np.sum(out * truth, -1)):.5f}"
                    else:
                        diff = float(np.max(np.abs(out - truth)))
                        notes[runtime] = f"max|d| {diff:.1e}"
                        if diff > atol:
                            notes[runtime] += f" > atol {atol:g}: NOT TIMED"
                            continue
                    if warm > 20:
                        notes[runtime] += f", first call {warm:.0f} s"
                    timed_calls[runtime] = calls[runtime]
                samples = {r: [] for r in timed_calls}
                order = list(timed_calls)
                for rep in range(reps):
                    shift = rep % max(len(order), 1)
                    for runtime in order[shift:] + order[:shift]:
                        # XLA's, ORT's, OpenVINO's and OpenMP's worker threads spin for a while after a call;
                        # a pause keeps that off the next runtime's clock
                        time.sleep(pause)
                        t = time.perf_counter()
                        timed_calls[runtime]()
                        samples[runtime].append(time.perf_counter() - t)
                median = {r: statistics.median(v) for r, v in samples.items()}
                flops = batch * model_flops(ours.config, kind, ours.config.vision.num_positions if ours.config.vision else 0)
                workload = f"{key} {kind}s b={batch}"
                for runtime in runtimes:
                    row = dict(variant=key, kind=kind, batch=batch, runtime=runtime, note=notes.get(runtime, ""))
                    if runtime in median:
                        row.update(per_s=batch / median[runtime], gflops=flops / median[runtime] / 1e9,
                                   ours_over=(median[runtime] / median["ours"]) if "ours" in median else None)
                    rows.append(row)
                    print(format_row(workload, row, limits.get(f"{key} {kind}", peak)), flush=True)
            # free this tower's sessions (the calls hold them too) before the next tower's export
            sessions = compiled = calls = timed_calls = None
            gc.collect()
    return rows


def format_row(workload: str, row: dict, limit: float) -> str:
    if "per_s" not in row:
        return f"{row['runtime']:>9} | {workload:<28} | {'-':>9} | {'-':>12} | {'-':>16} | {row['note']}"
    ratio = f"{row['ours_over']:.2f}x" if row["ours_over"] is not None else "-"
    return (f"{row['runtime']:>9} | {workload:<28} | {row['per_s']:9.2f} | {ratio:>12} | "
            f"{row['gflops']:8.0f} ({row['gflops'] / limit:4.0%}) | {row['note']}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["b16-224", "so400m14-384", "naflex-b16-256"], choices=VARIANTS)
    parser.add_argument("--kinds", nargs="+", default=["image", "text"], choices=["image", "text"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--atol", type=float, default=1e-4,
                        help="largest |difference| of normalized fp32 embeddings from transformers eager (default 1e-4)")
    parser.add_argument("--weights", choices=["trained", "init"], default="trained")
    parser.add_argument("--pause", type=float, default=0.2, help="seconds of sleep before each timed call (default 0.2)")
    parser.add_argument("--limit", help="JSON written by bench/gemm_limit.py --json: GFLOP/s as a share of each "
                                        "tower's best-GEMM limit instead of XLA's 2048^2 matmul")
    args = parser.parse_args(argv)
    if any(b < 1 for b in args.batches) or args.reps < 1:
        parser.error("--batches and --reps must be >= 1")
    if args.pause < 0:
        parser.error("--pause must be >= 0")
    if any(r in ONNX_RUNTIMES for r in args.runtimes):
        missing = [m for m in ("onnx", "onnxruntime", "onnxscript", "openvino") if importlib.util.find_spec(m) is None]
        if missing:
            parser.error(f"{', '.join(missing)} missing: pip install -e '.[bench]', or leave out --runtimes {' '.join(ONNX_RUNTIMES)}")
    limits = {}
    if args.limit:
        try:
            limits = json.loads(Path(args.limit).read_text())["towers"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            parser.error(f"--limit {args.limit}: not a bench/gemm_limit.py --json file ({first_line(error)})")
    torch.set_num_threads(CORES)
    print(describe(), flush=True)
    peak = matmul_peak_gflops()
    versions = [f"jax {jax.__version__}", f"torch {torch.__version__}", f"transformers {transformers.__version__}"]
    for name in ("onnxruntime", "openvino"):
        try:
            versions.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            pass
    print(f"{platform.processor() or platform.machine()}, {CORES} cores; {', '.join(versions)}; fp32; "
          f"XLA 2048^2 matmul peak {peak:.0f} GFLOP/s (the best GEMM of every library: bench/gemm_limit.py)", flush=True)
    share = "of limit" if limits else "of peak"
    if limits:
        print("best-GEMM limits (bench/gemm_limit.py): " + ", ".join(f"{k} {v:.0f}" for k, v in limits.items()), flush=True)
    print(f"{'runtime':>9} | {'workload':<28} | {'items/s':>9} | ours/runtime | {'GFLOP/s (' + share + ')':>16} | check", flush=True)
    for key in args.variants:
        bench_variant(key, args.kinds, args.batches, args.runtimes, args.reps, args.atol, args.weights, peak, limits,
                      args.pause)


if __name__ == "__main__":
    main()
