"""vae_tiling through the pipelines: below one tile it is the plain decode; above, it stays close to it."""

import numpy as np
from flux_reference import build_reference_pipeline
from qwen_reference import build_reference_pipeline as build_qwen

from flashdiff import Pipeline
from flashdiff.engine.pipeline import VAE_TILE


def _images(path, tiling, size, **kw):
    pipe = Pipeline.from_pretrained(str(path), dtype="float32", vae_tiling=tiling)
    return np.asarray(pipe.generate("a lighthouse", steps=1, height=size, width=size, seed=2, progress=False, **kw)[0],
                      np.float32)


def test_flux_tiled_decode(tmp_path):
    _, path = build_reference_pipeline(tmp_path, guidance_embeds=False)
    small = VAE_TILE[0] * 8  # one tile: exactly the plain decode
    assert np.array_equal(_images(path, True, small, max_sequence_length=16), _images(path, False, small, max_sequence_length=16))
    big = small + 256  # several tiles, blended
    tiled, plain = _images(path, True, big, max_sequence_length=16), _images(path, False, big, max_sequence_length=16)
    assert not np.array_equal(tiled, plain)
    assert np.abs(tiled - plain).mean() < 0.1 * plain.std() + 1.0


def test_qwen_tiled_decode(tmp_path):
    _, path = build_qwen(tmp_path)
    small = VAE_TILE[0] * 8
    kw = dict(max_sequence_length=16, true_cfg=1.0)
    assert np.array_equal(_images(path, True, small, **kw), _images(path, False, small, **kw))
    meta = Pipeline.from_pretrained(str(path), dtype="float32", vae_tiling=True).generate(
        "x", steps=1, height=32, width=32, seed=1, progress=False, **kw)[0].info["flashdiff"]
    assert meta["vae_tiling"] is True
