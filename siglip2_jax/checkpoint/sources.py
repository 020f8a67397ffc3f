"""Where weights come from: a local HF directory, or a hub id fetched with `huggingface_hub`."""

from __future__ import annotations

from pathlib import Path

from .safetensors_reader import PICKLE_SUFFIXES, WeightsError, refuse_pickle_message

HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.model", "tokenizer.json",
             "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json", "processor_config.json",
             "*.npz", "*.model"]  # big_vision checkpoints (the google/siglip2-*-jax repos) and their tokenizer


class SourceError(ValueError):
    """A source that is neither a usable directory nor a reachable hub id."""


def resolve_source(source: str | Path) -> Path:
    """A local directory as is; otherwise a hub id ("google/siglip2-base-patch16-224"), downloaded
    (safetensors only, never pickles) into the Hugging Face cache. Raises WeightsError for a pickle file,
    SourceError for another file, or for a path that does not exist and is no hub id it can download."""
    path = Path(source).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix in PICKLE_SUFFIXES:
                raise WeightsError(refuse_pickle_message(path))
            raise SourceError(f"{path}: expected a directory (with config.json and *.safetensors), got a file")
        return path
    text = str(source)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise SourceError(f"{source}: no such file or directory, and not a hub id of the form owner/name")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(text, allow_patterns=HUB_FILES))
    except Exception as err:  # the hub raises many types; all mean the same thing to the user
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SourceError(
            # a mistyped local path (ckpt/b16-22) looks like a hub id too: say first that it is not a local one
            f"{source}: no such file or directory, and could not download it from the Hugging Face hub ({reason}). "
            f"Offline? Download it elsewhere (`hf download {source} --local-dir {text.split('/')[1]}`) and pass "
            f"the local directory instead.") from None
