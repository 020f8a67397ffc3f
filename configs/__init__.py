"""Presets: the HF config.json of every released SigLIP 2 checkpoint, named after its hub id."""
