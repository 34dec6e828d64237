"""Tiled decoding for any image VAE: overlapping latent tiles, decoded one at a time, blended linearly.

Peak memory is that of decoding one tile plus the output image. Results differ slightly from an
untiled decode (group norms, attention and zero padding see only their tile); the overlap hides seams.
"""

import mlx.core as mx


def decode_in_tiles(decode, z: mx.array, scale: int, out_channels: int, tile: int = 64, overlap: int = 16,
                    dtype=None) -> mx.array:
    """decode: (B, h, w, C) latents -> (B, h*scale, w*scale, out_channels) pixels. z: NHWC latents.
    tile / overlap in latent pixels. A latent that fits in one tile is decoded directly."""
    if not 0 <= overlap < tile:
        raise ValueError(f"tiled decode needs 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    b, h, w, _ = z.shape
    if h <= tile and w <= tile:
        return decode(z)
    f = scale
    ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    out = mx.zeros((b, h * f, w * f, out_channels), dtype=mx.float32)
    total = mx.zeros((1, h * f, w * f, 1), dtype=mx.float32)
    for yi, y0 in enumerate(ys):
        y1 = min(y0 + tile, h)
        wy = ramp(ys, yi, tile, h, f)
        for xi, x0 in enumerate(xs):
            x1 = min(x0 + tile, w)
            wgt = (wy[:, None] * ramp(xs, xi, tile, w, f)[None, :])[None, :, :, None]
            dec = decode(z[:, y0:y1, x0:x1]).astype(mx.float32)
            out[:, y0 * f : y1 * f, x0 * f : x1 * f] += dec * wgt
            total[:, y0 * f : y1 * f, x0 * f : x1 * f] += wgt
            mx.eval(out, total)
    out = out / total
    return out if dtype is None else out.astype(dtype)


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile start offsets covering [0, size), evenly spread, neighbours overlapping >= `overlap`."""
    if size <= tile:
        return [0]
    n = -(-(size - overlap) // (tile - overlap))
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def ramp(starts: list[int], i: int, tile: int, size: int, f: int) -> mx.array:
    """1-D blend weight (in output pixels) of tile i: linear ramps over the overlaps with its neighbours."""
    s, e = starts[i], min(starts[i] + tile, size)
    n = (e - s) * f
    pos = mx.arange(n, dtype=mx.float32) + 0.5
    wgt = mx.ones((n,), dtype=mx.float32)
    if i > 0:
        left = (min(starts[i - 1] + tile, size) - s) * f
        wgt = mx.minimum(wgt, pos / left)
    if i < len(starts) - 1:
        right = (e - starts[i + 1]) * f
        wgt = mx.minimum(wgt, (n - pos) / right)
    return wgt
