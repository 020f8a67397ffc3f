"""big_vision SigLIP 2 `.npz` checkpoints -> our params.

big_vision publishes the 17 SigLIP 2 checkpoints as `siglip2_{variant}.npz` (`b16_224`, ..., `g-opt16_384`,
`b16_naflex`, `so400m16_naflex`): a zip of `.npy` arrays named by their flax path, e.g.
`params/img/Transformer/encoderblock_3/MultiHeadDotProductAttention_0/query/kernel` (D, heads, head_dim).
Encoder blocks are stored either one per layer (`encoderblock_{i}`) or scanned (`encoderblock`, with a
leading depth axis); both are read.

The names and shapes come from big_vision's `models/vit.py`, `models/proj/image_text/two_towers.py`,
`text_transformer.py` and `naflex_vit.py`; the correspondence with transformers' tensors is the one
transformers' `convert_siglip2_to_hf.py` uses. This module only says which big_vision array is which HF
tensor (`BigVisionCheckpoint` presents the `.npz` under HF names); `hf.key_table` remains the one table
from HF tensors to our parameters.

Safety and memory: `allow_pickle=False` (an object array is refused before anything is read), every name,
shape and dtype is checked from the `.npy` headers before any data is read, and then one array (one layer
of a scanned array) at a time is read, straight from its offset in the file for stored members (what
`np.load(mmap_mode="r")` would page in, without keeping the pages resident) and through
`np.load(..., mmap_mode="r", allow_pickle=False)` for compressed ones.
"""

from __future__ import annotations

import dataclasses
import json
import re
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from ..config import ConfigError, Siglip2Config
from .hf import hf_shapes
from .safetensors_reader import WeightsError

# big_vision's variant names (the file name's middle part) -> our preset (the HF id's name).
VARIANTS = {
    "b32_256": "siglip2-base-patch32-256",
    "b16_224": "siglip2-base-patch16-224", "b16_256": "siglip2-base-patch16-256",
    "b16_384": "siglip2-base-patch16-384", "b16_512": "siglip2-base-patch16-512",
    "l16_256": "siglip2-large-patch16-256", "l16_384": "siglip2-large-patch16-384",
    "l16_512": "siglip2-large-patch16-512",
    "so400m14_224": "siglip2-so400m-patch14-224", "so400m14_384": "siglip2-so400m-patch14-384",
    "so400m16_256": "siglip2-so400m-patch16-256", "so400m16_384": "siglip2-so400m-patch16-384",
    "so400m16_512": "siglip2-so400m-patch16-512",
    "g-opt16_256": "siglip2-giant-opt-patch16-256", "g-opt16_384": "siglip2-giant-opt-patch16-384",
    "b16_naflex": "siglip2-base-patch16-naflex", "so400m16_naflex": "siglip2-so400m-patch16-naflex",
}  # fmt: skip


def variant_of(path: str | Path) -> str:
    """The big_vision variant named in a file name (`siglip2_so400m14_384.npz` -> "so400m14_384").

    Raises ConfigError (one line, listing the variants) when the name contains none or several."""
    stem = Path(path).name.lower().removesuffix(".npz")
    found = [v for v in VARIANTS if re.search(rf"(^|[^a-z0-9-]){re.escape(v)}($|[^a-z0-9])", stem)]
    if len(found) == 1:
        return found[0]
    what = f"names several variants ({', '.join(found)})" if found else "names no known big_vision variant"
    raise ConfigError(f"{path}: the file name {what}; rename it to siglip2_VARIANT.npz or pass --config "
                      f"configs/NAME.json. Variants: {', '.join(VARIANTS)}")


def variant_config(variant: str) -> Siglip2Config:
    return Siglip2Config.preset(VARIANTS[variant])


def preprocessor_config(config: Siglip2Config) -> dict:
    """The HF `preprocessor_config.json` of a released checkpoint with this config (the hub files'
    settings: bilinear resize, rescale 1/255, normalize to [-1, 1]; FixRes image size, NaFlex patch budget)."""
    v = config.vision
    common = dict(do_resize=True, resample=2, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                  image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    if v.naflex:
        return dict(image_processor_type="Siglip2ImageProcessor", processor_class="Siglip2Processor",
                    patch_size=v.patch_size, max_num_patches=v.num_patches, **common)
    return dict(image_processor_type="SiglipImageProcessor", processor_class="SiglipProcessor",
                size={"height": v.image_size, "width": v.image_size}, **common)


def tokenizer_config(config: Siglip2Config) -> dict:
    """HF `tokenizer_config.json` for the Gemma vocabulary as SigLIP 2 uses it: no BOS, EOS appended,
    right padding to 64 (transformers' convert_siglip2_to_hf.py builds its tokenizer this way)."""
    return dict(tokenizer_class="GemmaTokenizer", add_bos_token=False, add_eos_token=True, padding_side="right",
                model_max_length=config.text.max_length, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                unk_token="<unk>", processor_class="Siglip2Processor" if config.naflex else "SiglipProcessor")


def hf_assets(config: Siglip2Config, *, with_tokenizer: bool) -> dict[str, str]:
    """{file name: JSON text} of the preprocessing (and tokenizer settings) files a checkpoint of this
    config needs for `transformers.AutoProcessor`."""
    files = {}
    if config.vision is not None:
        files["preprocessor_config.json"] = json.dumps(preprocessor_config(config), indent=2) + "\n"
    if with_tokenizer and config.text is not None:
        files["tokenizer_config.json"] = json.dumps(tokenizer_config(config), indent=2) + "\n"
    return files


# ---- which big_vision array is which HF tensor ------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Source:
    npz: tuple[str, ...]            # big_vision array names, before the layer block and root prefix
    to_hf: Callable                 # arrays (one layer's slice when stacked) -> the HF tensor
    shape: tuple[int, ...]          # the shape of each big_vision array (of one layer when stacked)
    layer: int | None = None        # encoder layer index; None outside the encoder


def _t(a):                          # flax Dense (in, out) -> torch Linear (out, in)
    return a.T


def _heads_in(a):                   # attention q/k/v kernel (D, heads, head_dim) -> (heads*head_dim, D)
    return a.reshape(a.shape[0], -1).T


def _heads_out(a):                  # attention out kernel (heads, head_dim, D) -> (D, heads*head_dim)
    return a.reshape(-1, a.shape[-1]).T


def _rows(a):                       # position tables (1, N, D) or NaFlex's (h, w, D) -> (N, D)
    return a.reshape(-1, a.shape[-1])


def _same(a):
    return a


def _vector(a):
    return a.reshape(-1)


def _conv(a):                       # flax conv HWIO -> torch OIHW
    return a.transpose(3, 2, 0, 1)


def _in_proj(*qkv):                 # MAP head: torch nn.MultiheadAttention packs [Wq; Wk; Wv]
    return np.concatenate([_heads_in(a) for a in qkv])


def _in_proj_bias(*qkv):
    return np.concatenate([a.reshape(-1) for a in qkv])


def _norm(hf: str, bv: str, d: int) -> dict[str, Source]:
    return {f"{hf}.weight": Source((f"{bv}/scale",), _vector, (d,)), f"{hf}.bias": Source((f"{bv}/bias",), _vector, (d,))}


def _mlp(hf: str, bv: str, d: int, mlp: int) -> dict[str, Source]:
    return {f"{hf}.fc1.weight": Source((f"{bv}/Dense_0/kernel",), _t, (d, mlp)),
            f"{hf}.fc1.bias": Source((f"{bv}/Dense_0/bias",), _vector, (mlp,)),
            f"{hf}.fc2.weight": Source((f"{bv}/Dense_1/kernel",), _t, (mlp, d)),
            f"{hf}.fc2.bias": Source((f"{bv}/Dense_1/bias",), _vector, (d,))}


def _encoder(hf: str, bv: str, d: int, mlp: int, heads: int, depth: int) -> dict[str, Source]:
    sources = {}
    hd = d // heads
    for i in range(depth):
        layer, block = f"{hf}encoder.layers.{i}.", f"{bv}/encoderblock_{{i}}/"
        attn = f"{block}MultiHeadDotProductAttention_0/"
        one = {
            **_norm(f"{layer}layer_norm1", f"{block}LayerNorm_0", d),
            **_norm(f"{layer}layer_norm2", f"{block}LayerNorm_1", d),
            **_mlp(f"{layer}mlp", f"{block}MlpBlock_0", d, mlp),
            f"{layer}self_attn.out_proj.weight": Source((f"{attn}out/kernel",), _heads_out, (heads, hd, d)),
            f"{layer}self_attn.out_proj.bias": Source((f"{attn}out/bias",), _vector, (d,)),
        }
        for ours, theirs in zip("qkv", ("query", "key", "value")):
            one[f"{layer}self_attn.{ours}_proj.weight"] = Source((f"{attn}{theirs}/kernel",), _heads_in, (d, heads, hd))
            one[f"{layer}self_attn.{ours}_proj.bias"] = Source((f"{attn}{theirs}/bias",), _vector, (heads, hd))
        sources.update({k: dataclasses.replace(s, layer=i) for k, s in one.items()})
    return sources


def hf_sources(config: Siglip2Config) -> dict[str, Source]:
    """{HF tensor name: the big_vision array(s) it is made of}, for a two-tower checkpoint."""
    v, t = config.vision, config.text
    if v is None or t is None:
        raise ConfigError("big_vision checkpoints hold both towers; this config has only one")
    d, hd, p = v.width, v.width // v.num_heads, v.patch_size
    head = "img/MAPHead_0/MultiHeadDotProductAttention_0/"
    qkv = tuple(f"{head}{n}/kernel" for n in ("query", "key", "value"))
    sources = {
        # NaFlex embeds pre-cut (py, px, c) patches with a Dense; FixRes with a p x p conv
        "vision_model.embeddings.patch_embedding.weight":
            Source(("img/embedding/kernel",), _t, (v.patch_dim, d)) if v.naflex
            else Source(("img/embedding/kernel",), _conv, (p, p, v.num_channels, d)),
        "vision_model.embeddings.patch_embedding.bias": Source(("img/embedding/bias",), _vector, (d,)),
        "vision_model.embeddings.position_embedding.weight":
            Source(("img/pos_embedding",), _rows, (v.grid_size, v.grid_size, d) if v.naflex else (1, v.num_positions, d)),
        **_encoder("vision_model.", "img/Transformer", d, v.mlp_dim, v.num_heads, v.depth),
        **_norm("vision_model.post_layernorm", "img/Transformer/encoder_norm", d),
        "vision_model.head.probe": Source(("img/MAPHead_0/probe",), _same, (1, 1, d)),
        "vision_model.head.attention.in_proj_weight": Source(qkv, _in_proj, (d, v.num_heads, hd)),
        "vision_model.head.attention.in_proj_bias":
            Source(tuple(f"{head}{n}/bias" for n in ("query", "key", "value")), _in_proj_bias, (v.num_heads, hd)),
        "vision_model.head.attention.out_proj.weight": Source((f"{head}out/kernel",), _heads_out, (v.num_heads, hd, d)),
        "vision_model.head.attention.out_proj.bias": Source((f"{head}out/bias",), _vector, (d,)),
        **_norm("vision_model.head.layernorm", "img/MAPHead_0/LayerNorm_0", d),
        **_mlp("vision_model.head.mlp", "img/MAPHead_0/MlpBlock_0", d, v.mlp_dim),
        "text_model.embeddings.token_embedding.weight": Source(("txt/Embed_0/embedding",), _same, (t.vocab_size, t.width)),
        "text_model.embeddings.position_embedding.weight": Source(("txt/pos_embedding",), _rows, (1, t.max_length, t.width)),
        **_encoder("text_model.", "txt/Encoder_0", t.width, t.mlp_dim, t.num_heads, t.depth),
        **_norm("text_model.final_layer_norm", "txt/Encoder_0/encoder_norm", t.width),
        "text_model.head.weight": Source(("txt/head/kernel",), _t, (t.width, t.projection_size)),
        "text_model.head.bias": Source(("txt/head/bias",), _vector, (t.projection_size,)),
        "logit_scale": Source(("t",), _vector, (1,)),   # big_vision's t is already log(scale)
        "logit_bias": Source(("b",), _vector, (1,)),
    }
    return sources


# ---- reading the .npz ------------------------------------------------------------------------------
class NpzArchive:
    """The `.npy` members of an `.npz`: names, shapes and dtypes from their headers alone, and each array
    memory-mapped (stored members) or read on its own (compressed members). Never unpickles."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with zipfile.ZipFile(self.path) as archive:
                infos = archive.infolist()
                self.members = {}
                for info in infos:
                    name = info.filename.removesuffix(".npy")
                    with archive.open(info) as f:
                        self.members[name] = (info, *self._header(f, name))
        except zipfile.BadZipFile:
            raise WeightsError(f"{self.path}: not an .npz archive, or truncated (no zip directory at its end)") from None
        except (OSError, EOFError) as err:
            raise WeightsError(f"{self.path}: cannot read ({err})") from None
        self._npz = np.load(self.path, mmap_mode="r", allow_pickle=False)

    def _header(self, f, name: str) -> tuple[tuple[int, ...], np.dtype, int]:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        except (ValueError, EOFError) as err:
            raise WeightsError(f"{self.path}: {name} is not a valid .npy array ({err})") from None
        if dtype.hasobject:
            raise WeightsError(f"{self.path}: {name} is a pickled object array; refusing to unpickle it "
                               f"(a real checkpoint holds only numeric arrays)")
        if fortran:
            raise WeightsError(f"{self.path}: {name} is stored in Fortran order, which big_vision never writes")
        return tuple(shape), dtype, f.tell()

    def keys(self) -> list[str]:
        return list(self.members)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.members[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self.members[name][2]

    def read(self, name: str, layer: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """The array, or its `layer`-th slice along the first axis, into `out` if given (C-contiguous,
        that shape and dtype). Stored members are read straight from their place in the file: the bytes
        of that slice only, without keeping mapped pages resident (peak memory is the result's size)."""
        info, shape, dtype, data_offset = self.members[name]
        shape = shape[1:] if layer is not None else shape
        if out is None:
            out = np.empty(shape, dtype)
        if info.compress_type != zipfile.ZIP_STORED:  # np.savez_compressed: decompress the member
            array = self._npz[name]
            out[...] = array[layer] if layer is not None else array
            return out
        nbytes = int(np.prod(shape)) * dtype.itemsize
        with open(self.path, "rb") as f:
            f.seek(info.header_offset + 26)
            name_len, extra_len = np.frombuffer(f.read(4), "<u2")
            f.seek(info.header_offset + 30 + int(name_len) + int(extra_len) + data_offset + (layer or 0) * nbytes)
            if f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != nbytes:
                raise WeightsError(f"{self.path}: truncated inside {name}")
        return out


class BigVisionCheckpoint:
    """A big_vision `.npz` presented under HF tensor names, for `hf.iter_checkpoint_params`.

    Construction checks the whole file against the config from the headers: a missing or unexpected
    array, a wrong shape or a dtype other than float32 is a `WeightsError` naming the file and the array
    (and both shapes)."""

    def __init__(self, path: str | Path, config: Siglip2Config):
        self.path = Path(path)
        self.archive = NpzArchive(self.path)
        names = set(self.archive.keys())
        self.root = "params/" if any(n.startswith("params/") for n in names) else ""
        self.sources = hf_sources(config)
        self.scanned = {tower: f"{self.root}{tower}/encoderblock/LayerNorm_0/scale" in names
                        for tower in ("img/Transformer", "txt/Encoder_0")}
        depth = {"img/Transformer": config.vision.depth, "txt/Encoder_0": config.text.depth}
        expected: dict[str, tuple[int, ...]] = {}
        for source in self.sources.values():
            for template in source.npz:
                name, shape = self._name(template, source.layer), source.shape
                if source.layer is not None and self._tower_scanned(template):
                    shape = (depth[template.split("/encoderblock")[0]], *shape)
                expected[name] = shape
        missing = sorted(set(expected) - names)
        if missing:
            raise WeightsError(f"{self.path}: missing {missing[0]} ({len(missing)} missing arrays in all): "
                               f"the file does not match the {config.name or 'given'} architecture")
        unexpected = sorted(names - set(expected))
        if unexpected:
            raise WeightsError(f"{self.path}: unexpected array {unexpected[0]} {self.archive.shape(unexpected[0])} "
                               f"({len(unexpected)} unexpected in all): the file does not match the "
                               f"{config.name or 'given'} architecture")
        for name, shape in expected.items():
            if self.archive.shape(name) != shape:
                raise WeightsError(f"{self.path}: {name} has shape {self.archive.shape(name)} but the "
                                   f"{config.name or 'given'} architecture needs {shape}")
            if self.archive.dtype(name) != np.float32:
                raise WeightsError(f"{self.path}: {name} is {self.archive.dtype(name)}, expected float32")
        self.hf_shapes = hf_shapes(config)

    def _tower_scanned(self, template: str) -> bool:
        return any(template.startswith(t) and s for t, s in self.scanned.items())

    def _name(self, template: str, layer: int | None) -> str:
        if layer is not None and self._tower_scanned(template):
            template = template.replace("/encoderblock_{i}/", "/encoderblock/")
        return self.root + template.format(i=layer)

    def _read(self, template: str, layer: int | None, out: np.ndarray | None = None) -> np.ndarray:
        scanned = layer is not None and self._tower_scanned(template)
        return self.archive.read(self._name(template, layer), layer if scanned else None, out)

    # the HFCheckpoint interface
    def keys(self) -> list[str]:
        return list(self.sources)

    def file_of(self, key: str) -> Path:
        return self.path

    def shape(self, key: str) -> tuple[int, ...]:
        return self.hf_shapes[key]  # what the arrays checked in __init__ become

    def dtype(self, key: str) -> np.dtype:
        return np.dtype(np.float32)

    def read(self, key: str) -> np.ndarray:
        source = self.sources[key]
        return np.ascontiguousarray(source.to_hf(*(self._read(n, source.layer) for n in source.npz)))

    def read_into(self, key: str, out: np.ndarray) -> None:
        source = self.sources[key]
        if source.to_hf is _same and out.flags.c_contiguous:  # the embedding tables: no temporary copy
            self._read(source.npz[0], source.layer, out.reshape(source.shape))
        else:
            out[...] = source.to_hf(*(self._read(n, source.layer) for n in source.npz)).reshape(out.shape)


# ---- conversion ------------------------------------------------------------------------------------
def find_npz(source: str | Path) -> Path | None:
    """The `.npz` a source names: the file itself, or the only one in a directory; None when the source
    is not a big_vision checkpoint (no `.npz` there). Several in one directory is a `SourceError`."""
    from .sources import SourceError

    path = Path(source)
    if path.is_file():
        return path if path.suffix == ".npz" else None
    if not path.is_dir() or (path / "config.json").exists():
        return None
    found = sorted(path.glob("*.npz"))
    if len(found) > 1:
        raise SourceError(f"{path}: holds several .npz files ({', '.join(p.name for p in found)}); pass one of them")
    return found[0] if found else None


def find_tokenizer(npz: Path, tokenizer: str | Path | None) -> Path | None:
    """`tokenizer` (a tokenizer.model or tokenizer.json file), else the only `*.model` beside the `.npz`."""
    from ..tokenizer import Tokenizer

    if tokenizer is None:
        found = sorted(npz.parent.glob("*.model"))
        if len(found) > 1:
            raise WeightsError(f"{npz.parent}: several *.model files beside {npz.name} "
                               f"({', '.join(p.name for p in found)}); choose one with --tokenizer")
        if not found:
            return None
        tokenizer = found[0]
    Tokenizer.from_file(tokenizer)  # a clear error now rather than when the checkpoint is used
    return Path(tokenizer)


def convert_big_vision(npz: str | Path, out_dir: str | Path, *, config: Siglip2Config | None = None,
                       tokenizer: str | Path | None = None, param_dtype=np.float32, overwrite: bool = False,
                       progress: bool = False) -> Path:
    """A big_vision SigLIP 2 `.npz` -> our checkpoint directory; returns OUT.

    config: the architecture; default: the big_vision variant named in the file name (`variant_of`).
    tokenizer: the Gemma `tokenizer.model` (or `tokenizer.json`); default: a `*.model` beside the `.npz`.
    Without one the checkpoint is still written, and `encode_texts` asks for one.
    The preprocessing and tokenizer settings files that `transformers.AutoProcessor` reads are written
    for the variant (`hf_assets`). Raises ConfigError (variant), WeightsError (file contents, naming the
    array), before anything is written; OUT appears only once complete.
    """
    from .hf import iter_checkpoint_params
    from .orbax_io import write_checkpoint

    npz = Path(npz)
    if config is None:
        config = variant_config(variant_of(npz))
    tokenizer_file = find_tokenizer(npz, tokenizer)
    checkpoint = BigVisionCheckpoint(npz, config)
    leaves = iter_checkpoint_params(checkpoint, config, param_dtype=param_dtype, progress=progress, where=npz)
    files = hf_assets(config, with_tokenizer=tokenizer_file is not None)
    if tokenizer_file is not None:
        files["tokenizer.json" if tokenizer_file.suffix == ".json" else "tokenizer.model"] = tokenizer_file
    return write_checkpoint(out_dir, config, leaves, source=str(npz), files=files, overwrite=overwrite)
