"""Model configuration: frozen dataclasses, read from (and written as) Hugging Face `config.json`.

One reader serves every source: the hub's `config.json` of a full model (`model_type` "siglip" for the
FixRes family, "siglip2" for NaFlex), the standalone vision/text configs, and our own presets in
`configs/`, which are stored in the same HF layout.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import string
from pathlib import Path
from typing import Any

# HF names the tanh-approximate GELU in several ways; "gelu" alone is the exact (erf) one.
_TANH_GELU = {"gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu_tanh"}
_EXACT_GELU = {"gelu"}

PRESETS_DIR = Path(str(importlib.resources.files("siglip2_jax.presets")))  # the repo's configs/
DEFAULT_MODEL = "google/siglip2-base-patch16-224"
DEFAULT_TEMPLATE = "This is a photo of {}."  # zero-shot prompt; `{}` is where the label goes


def check_template(template: str) -> str:
    """`template` if it has exactly one `{}` field (the label's place) and no other: `template.format(label)`
    must work for any label. Literal braces are written `{{` and `}}`, as in `str.format`.

    Raises ValueError naming the template and what is wrong with it."""
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as err:  # an unmatched brace
        raise ValueError(f"template {template!r}: {err} (write a literal brace as {{{{ or }}}})") from None
    if not fields:
        raise ValueError(f"template {template!r}: needs {{}} where the label goes")
    if fields != [("", "", None)]:
        found = ", ".join("{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
                          for name, spec, conversion in fields)
        raise ValueError(f"template {template!r}: needs exactly one {{}} where the label goes, and no other field "
                         f"(found: {found}); write a literal brace as {{{{ or }}}}")
    return template


class ConfigError(ValueError):
    """A config that this library cannot run, with the reason."""


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    patch_size: int
    image_size: int | None = None   # FixRes: the square input side; None for NaFlex
    naflex: bool = False
    num_patches: int = 256          # NaFlex: rows of the learned position grid (a square, 16x16)
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    approximate_gelu: bool = True

    def __post_init__(self):
        _check_heads(self.width, self.num_heads, "vision")
        if self.naflex:
            side = round(self.num_patches ** 0.5)
            if side * side != self.num_patches:
                raise ConfigError(f"vision num_patches={self.num_patches} is not a square grid")
        elif not self.image_size or self.image_size < self.patch_size:
            raise ConfigError(f"vision image_size={self.image_size} is smaller than patch_size={self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def grid_size(self) -> int:
        """Patches per side: FixRes crops (VALID conv), NaFlex's learned grid side."""
        if self.naflex:
            return round(self.num_patches ** 0.5)
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid_size ** 2

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.num_channels


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    projection_size: int
    max_length: int = 64
    layer_norm_eps: float = 1e-6
    approximate_gelu: bool = True

    def __post_init__(self):
        _check_heads(self.width, self.num_heads, "text")

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


@dataclasses.dataclass(frozen=True)
class Siglip2Config:
    """Both towers; either may be None for a standalone vision or text checkpoint."""

    vision: VisionConfig | None
    text: TextConfig | None
    name: str = dataclasses.field(default="", compare=False)  # where it came from; not part of the architecture

    def __post_init__(self):
        if self.vision is None and self.text is None:
            raise ConfigError("a config needs a vision tower, a text tower, or both")

    @property
    def naflex(self) -> bool:
        return self.vision is not None and self.vision.naflex

    @property
    def embed_dim(self) -> int:
        """Size of the shared embedding space (image pooled width = text projection)."""
        return self.vision.width if self.vision is not None else self.text.projection_size

    # ---- HF config.json <-> ours -------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any], name: str = "") -> "Siglip2Config":
        model_type = hf.get("model_type", "")
        if model_type in ("siglip", "siglip2"):
            vision_hf, text_hf = hf.get("vision_config"), hf.get("text_config")
            if vision_hf is None or text_hf is None:
                raise ConfigError(f"config model_type={model_type!r} needs both vision_config and text_config")
            naflex = model_type == "siglip2"
            config = cls(_vision_from_hf(vision_hf, naflex), _text_from_hf(text_hf), name)
        elif model_type in ("siglip_vision_model", "siglip2_vision_model"):
            config = cls(_vision_from_hf(hf, model_type == "siglip2_vision_model"), None, name)
        elif model_type in ("siglip_text_model", "siglip2_text_model"):
            config = cls(None, _text_from_hf(hf), name)
        else:
            raise ConfigError(f"model_type={model_type!r} is not a SigLIP / SigLIP 2 model")
        if config.vision is not None and config.text is not None and config.vision.width != config.text.projection_size:
            raise ConfigError(
                f"image embedding width {config.vision.width} != text projection_size "
                f"{config.text.projection_size}: the two towers would not share an embedding space")
        return config

    def to_hf(self) -> dict[str, Any]:
        vision = _vision_to_hf(self.vision) if self.vision is not None else None
        text = _text_to_hf(self.text) if self.text is not None else None
        family = "siglip2" if self.naflex else "siglip"
        if vision is not None and text is not None:
            return {"model_type": family, "vision_config": vision, "text_config": text}
        if vision is not None:
            return {"model_type": f"{family}_vision_model", **vision}
        return {"model_type": "siglip_text_model", **text}

    @classmethod
    def from_json(cls, path: str | Path) -> "Siglip2Config":
        path = Path(path)
        try:
            hf = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(hf, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        try:
            return cls.from_hf(hf, name=hf.get("_name_or_path", "") or path.parent.name)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None

    @classmethod
    def preset(cls, name: str) -> "Siglip2Config":
        """A released checkpoint's config by HF id ("google/siglip2-base-patch16-224") or its short name."""
        short = name.split("/")[-1]
        path = PRESETS_DIR / f"{short}.json"
        if not path.exists():
            raise ConfigError(f"unknown preset {name!r}; known: {', '.join(preset_names())}")
        return dataclasses.replace(cls.from_json(path), name=f"google/{short}")


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def _check_heads(width: int, heads: int, tower: str) -> None:
    if heads <= 0 or width % heads:
        raise ConfigError(f"{tower} hidden_size={width} is not divisible by num_attention_heads={heads}")


def _approximate_gelu(hf: dict[str, Any]) -> bool:
    act = hf.get("hidden_act", "gelu_pytorch_tanh")
    if act in _TANH_GELU:
        return True
    if act in _EXACT_GELU:
        return False
    raise ConfigError(f"hidden_act={act!r} is not supported (expected gelu_pytorch_tanh)")


def _require(hf: dict[str, Any], key: str, tower: str) -> Any:
    if key not in hf:
        raise ConfigError(f"{tower} config has no {key!r}")
    return hf[key]


def _square(value: Any, what: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ConfigError(f"{what}={value} is not square; only square sizes are supported")
        value = value[0]
    return int(value)


def _vision_from_hf(hf: dict[str, Any], naflex: bool) -> VisionConfig:
    if not hf.get("vision_use_head", True):
        raise ConfigError("vision_use_head=false (no pooling head) is not supported")
    if int(hf.get("num_channels", 3)) != 3:
        raise ConfigError(f"num_channels={hf['num_channels']} is not supported (RGB only)")
    common = dict(
        width=int(hf.get("hidden_size", 768)),
        depth=int(hf.get("num_hidden_layers", 12)),
        mlp_dim=int(hf.get("intermediate_size", 3072)),
        num_heads=int(hf.get("num_attention_heads", 12)),
        patch_size=_square(hf.get("patch_size", 16), "patch_size"),
        layer_norm_eps=float(hf.get("layer_norm_eps", 1e-6)),
        approximate_gelu=_approximate_gelu(hf),
    )
    if naflex:
        return VisionConfig(**common, naflex=True, num_patches=int(hf.get("num_patches", 256)))
    return VisionConfig(**common, image_size=_square(hf.get("image_size", 224), "image_size"))


def _text_from_hf(hf: dict[str, Any]) -> TextConfig:
    width = int(hf.get("hidden_size", 768))
    projection = hf.get("projection_size")
    return TextConfig(
        vocab_size=int(_require(hf, "vocab_size", "text")),
        width=width,
        depth=int(hf.get("num_hidden_layers", 12)),
        mlp_dim=int(hf.get("intermediate_size", 3072)),
        num_heads=int(hf.get("num_attention_heads", 12)),
        projection_size=int(projection) if projection is not None else width,
        max_length=int(hf.get("max_position_embeddings", 64)),
        layer_norm_eps=float(hf.get("layer_norm_eps", 1e-6)),
        approximate_gelu=_approximate_gelu(hf),
    )


def _gelu_name(approximate: bool) -> str:
    return "gelu_pytorch_tanh" if approximate else "gelu"


def _vision_to_hf(v: VisionConfig) -> dict[str, Any]:
    out = {
        "hidden_size": v.width, "num_hidden_layers": v.depth, "intermediate_size": v.mlp_dim,
        "num_attention_heads": v.num_heads, "patch_size": v.patch_size, "num_channels": v.num_channels,
        "layer_norm_eps": v.layer_norm_eps, "hidden_act": _gelu_name(v.approximate_gelu),
    }
    if v.naflex:
        out["num_patches"] = v.num_patches
    else:
        out["image_size"] = v.image_size
    return out


def _text_to_hf(t: TextConfig) -> dict[str, Any]:
    return {
        "vocab_size": t.vocab_size, "hidden_size": t.width, "num_hidden_layers": t.depth,
        "intermediate_size": t.mlp_dim, "num_attention_heads": t.num_heads,
        "projection_size": t.projection_size, "max_position_embeddings": t.max_length,
        "layer_norm_eps": t.layer_norm_eps, "hidden_act": _gelu_name(t.approximate_gelu),
    }
