"""The conversion program: python -m siglip2_convert (or python -m convert from the repo root)."""
