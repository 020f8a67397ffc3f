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


