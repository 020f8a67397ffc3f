import os

# 8 virtual CPU devices for the sharding tests; set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_model(tmp_path_factory):
    """A small Gemma-like SentencePiece tokenizer.model trained for this session (see tests/vocab.py)."""
    from vocab import train_gemma_like_tokenizer

    return train_gemma_like_tokenizer(tmp_path_factory.mktemp("vocab"))


def hf_dir_for(tmp, name, tokenizer_model, seed=0):
    """A scaled-down preset saved by transformers, with the session's tokenizer.model beside it."""
    import shutil

    from reference import make_reference, preset_hf_config, save_reference, scaled_down

    hf = scaled_down(preset_hf_config(name), vocab=4000)
    directory = save_reference(make_reference(hf, seed=seed), tmp / "hf")
    shutil.copy(tokenizer_model, directory / "tokenizer.model")
    return directory


@pytest.fixture(scope="session")
def fixres(tmp_path_factory, tokenizer_model):
    """A small random FixRes model (B/16@224 scaled down) with the test tokenizer: (HF dir, our checkpoint dir)."""
    tmp = tmp_path_factory.mktemp("fixres")
    directory = hf_dir_for(tmp, "siglip2-base-patch16-224", tokenizer_model)
    from siglip2_jax.checkpoint import convert

    convert(directory, tmp / "ours")
    return directory, tmp / "ours"




def cli(*args, env=None, **kwargs):
    """Run `siglip2-jax ARGS...` in a fresh process, offline; returns the CompletedProcess."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "siglip2_jax.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, **kwargs)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels and holds none: a decompression bomb's header."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def run_notebook(name: str, tmp_path, **env) -> str:
    """Execute notebooks/NAME top to bottom with extra environment variables; returns its text output."""
    from pathlib import Path

    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(Path(__file__).parents[1] / "notebooks" / name, as_version=4)
    env = {"MPLBACKEND": "Agg", **env}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
