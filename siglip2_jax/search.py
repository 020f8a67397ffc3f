"""Rank an `embed` output by similarity to a text or an image (`siglip2-jax search OUT "query"`).

The query is encoded by the model OUT was embedded with (its manifest names it; the fingerprint must
match), then scored against the stored embeddings a slice at a time: each part's .npy is mapped
`chunk_rows` rows at a time and unmapped again, and only the best `top_k` so far are kept. Memory is
bounded by `chunk_rows` (and k), whatever the size of the collection; only the parts holding the winners
have their index read, for the paths.

Scores are cosine similarities (both sides are L2-normalized). A text query against images (or an image
against captions) also gets the model's sigmoid probability that the pair matches.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from .embed_store import EmbedError, done_parts, part_files, part_layout, read_index, read_manifest

DEFAULT_CHUNK_ROWS = 16384  # 24 MiB of float16 B/16 embeddings (+ its float32 copy) per step


@dataclasses.dataclass
class Hit:
    rank: int
    path: str
    score: float                      # cosine similarity
    probability: float | None = None  # sigmoid(scale * score + bias), for text <-> image
    index: int = -1                   # position in the input listing


def search(out: str | Path, query: str | None = None, *, image=None, top_k: int = 10, model=None,
           chunk_rows: int = DEFAULT_CHUNK_ROWS, partial: bool = False) -> list[Hit]:
    """The `top_k` entries of OUT most similar to a text `query` or to `image` (a path, PIL image or
    array). `model`: a loaded `Siglip2Pipeline` or a path, instead of the one in OUT's manifest."""
    if (query is None) == (image is None):
        raise EmbedError("give a text QUERY or --image PATH: one of the two")
    if top_k < 1 or chunk_rows < 1:
        raise EmbedError(f"--top-k {top_k} / --chunk-rows {chunk_rows}: must be at least 1")
    manifest = read_manifest(out)
    pipeline = _model_for(manifest, model, out)
    query_kind = "text" if query is not None else "image"
    vector = (pipeline.encode_texts([query]) if query is not None else pipeline.encode_images([image]))[0]
    scores, parts, rows = top_k_scores(out, vector, top_k, chunk_rows=chunk_rows, partial=partial)
    hits, indexes = [], {}  # only the winners' parts have their index read
    for rank, (score, part, row) in enumerate(zip(scores, parts, rows), 1):
        if part not in indexes:
            indexes[part] = read_index(out, part)
        index = indexes[part]
        hits.append(Hit(rank, index["paths"][row], float(score), index=int(index["indices"][row])))
    if query_kind != manifest["kind"] and hits:  # the logit scale and bias were fitted to image-text pairs
        for hit, probability in zip(hits, pipeline.match_probability(scores)):
            hit.probability = float(probability)
    return hits


def top_k_scores(out: str | Path, query: np.ndarray, k: int, *, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                 partial: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scores, parts, rows) of the k stored embeddings with the largest dot product with `query`, best
    first (ties: earlier in the listing first), reading at most `chunk_rows` rows at a time."""
    query = np.asarray(query, np.float32)
    manifest = read_manifest(out)
    if query.shape != (manifest["dim"],):
        raise EmbedError(f"{out}: holds {manifest['dim']}-wide embeddings; the query is {query.shape}")
    best = np.zeros(0, np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    for part in done_parts(out, partial):
        npy, _ = part_files(out, part)
        offset, shape, dtype = part_layout(out, part, manifest, read_index(out, part))
        for start in range(0, shape[0], chunk_rows):
            n = min(chunk_rows, shape[0] - start)
            # A map of just this slice, dropped after use: pages read stay out of the process's memory.
            chunk = np.memmap(npy, dtype, "r", offset + start * shape[1] * dtype.itemsize, (n, shape[1]))
            scores = np.asarray(chunk, np.float32) @ query
            del chunk
            keep = np.argpartition(-scores, k - 1)[:k] if n > k else np.arange(n)
            best = _best(k, (best[0], scores[keep]), (best[1], np.full(len(keep), part)),
                         (best[2], keep + start))
    return best


def _best(k, scores, parts, rows):
    scores, parts, rows = (np.concatenate(pair) for pair in (scores, parts, rows))
    order = np.lexsort((rows, parts, -scores))[:k]  # by score, then listing order
    return scores[order], parts[order], rows[order]


def _model_for(manifest: dict, model, out):
    from .model_source import ModelSource
    from .pipeline import Siglip2Pipeline, load

    # An image query is preprocessed as OUT's images were: the same NaFlex budget and FixRes size.
    options = manifest["options"]
    settings = {"max_num_patches": options.get("max_num_patches"), "image_size": options.get("image_size")}
    if isinstance(model, Siglip2Pipeline):
        if manifest["kind"] == "image" and model.preprocessor is not None:
            ours = {"max_num_patches": model.preprocessor.max_num_patches,
                    "image_size": model.preprocessor.image_size if settings["image_size"] else None}
            for name, value in settings.items():
                if value is not None and ours[name] != value:
                    raise EmbedError(f"this pipeline has {name}={ours[name]}, OUT was embedded with {value}: "
                                     f"load the model with {name}={value}")
        return model
    recorded = manifest.get("model") if isinstance(manifest.get("model"), dict) else {}
    if model is None and not isinstance(recorded.get("source"), str):   # a manifest written by hand
        raise EmbedError(f"{Path(out) / 'manifest.json'}: names no model (model.source); pass the model OUT was "
                         "embedded with")
    given = model if model is not None else recorded["source"]
    source = ModelSource(given)
    if isinstance(recorded.get("fingerprint"), str) and source.fingerprint != recorded["fingerprint"]:
        raise EmbedError(f"{given}: not the model this OUT was embedded with ({recorded.get('source')})")
    return load(source, **settings)
