"""Notebooks as a newcomer runs them: paths given relative to the folder Jupyter was started in, and no
temporary folder left behind. (Each notebook's top-to-bottom run is tested beside its module:
test_pipeline, test_search, test_train.)"""

from __future__ import annotations

import os

from conftest import run_notebook


def test_notebook_02_relative_paths_and_no_leftovers(fixres, tmp_path):
    start = tmp_path / "start"  # where the user typed `jupyter lab`; $PWD names it in the kernel
    (start / "my photos" / "reds").mkdir(parents=True)
    from PIL import Image

    for i, color in enumerate(["red", "darkred", "orange"]):
        Image.new("RGB", (60 + 10 * i, 50), color).save(start / "my photos" / "reds" / f"{i}.png")
    (start / "model").symlink_to(fixres[1], target_is_directory=True)
    kernel = tmp_path / "kernel"  # the notebook's folder: the kernel's working directory
    kernel.mkdir()
    temporary = tmp_path / "tmp"
    temporary.mkdir()

    outputs = run_notebook("02_sharded_embedding_and_search.ipynb", kernel, PWD=str(start), TMPDIR=str(temporary),
                           SIGLIP2_IMAGES="my photos", SIGLIP2_MODEL="model",
                           XLA_FLAGS="--xla_force_host_platform_device_count=8")
    assert "embedded 3 of 3 images" in outputs
    assert "reds/0.png" in outputs  # hits are shown relative to the relative folder given
    assert not any(p.name.startswith("siglip2-") for p in temporary.iterdir()), sorted(temporary.iterdir())
    assert sorted(os.listdir(start)) == ["model", "my photos"] and not any(kernel.iterdir())  # wrote nothing there
