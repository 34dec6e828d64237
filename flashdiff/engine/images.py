"""Writing images: atomic, with the generation parameters embedded (PNG text chunks)."""

import json
import os
import tempfile
from pathlib import Path

from PIL import Image, PngImagePlugin

from .errors import FlashdiffError
from .weights import atomic_path

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def output_paths(output: str, count: int, seeds: list) -> list[Path]:
    """One path per image: `out.png` for one image, `out-<seed>.png` (or `out-<i>`) for several."""
    path = Path(output).expanduser()
    if path.suffix.lower() not in FORMATS:
        raise FlashdiffError(f"output {path} must end in one of {', '.join(FORMATS)}")
    if count == 1:
        return [path]
    tags = [str(s) for s in seeds] if seeds and len(set(seeds)) == count and None not in seeds else [str(i) for i in range(count)]
    return [path.with_name(f"{path.stem}-{t}{path.suffix}") for t in tags]


def check_output_path(path):
    """Raise FlashdiffError unless an image can be written at `path` (its folder exists and is writable, and
    the path is not a folder); the CLI calls it before generating, so a bad path costs no generation time."""
    path = Path(path).expanduser()
    if not path.parent.is_dir():
        raise FlashdiffError(f"output folder {path.parent} does not exist; create it first or choose another --output")
    if path.is_dir():
        raise FlashdiffError(f"output {path} is a folder; pass a file name such as {path / 'image.png'}")
    try:  # a real probe: permissions, read-only file systems and ACLs all show up here
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=".flashdiff-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise FlashdiffError(f"cannot write to the output folder {path.parent} ({e.strerror or e}); "
                             "choose a writable --output") from None


def save_image(image: Image.Image, path, metadata: dict | None = None):
    """Save atomically (temporary file + rename). PNG gets metadata as text chunks: `parameters`
    (JSON of everything) plus one chunk per field; other formats get it as a JSON comment where
    the format has one."""
    path = Path(path).expanduser()
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise FlashdiffError(f"cannot write {path}: use a .png, .jpg or .webp file name")
    if not path.parent.exists():
        raise FlashdiffError(f"output folder {path.parent} does not exist")
    metadata = metadata if metadata is not None else image.info.get("flashdiff")
    kwargs = {}
    if metadata and fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", json.dumps(metadata, ensure_ascii=False))
        for k, v in metadata.items():
            if v is not None:
                info.add_itxt(k, v if isinstance(v, str) else json.dumps(v, ensure_ascii=False))
        kwargs["pnginfo"] = info
    elif metadata and fmt == "JPEG":
        kwargs["comment"] = json.dumps(metadata, ensure_ascii=False).encode()
        kwargs["quality"] = 95
    try:
        with atomic_path(path) as tmp:
            image.save(tmp, format=fmt, **kwargs)
    except OSError as e:  # read-only or full disk, permissions: the image is lost, but say why plainly
        raise FlashdiffError(f"cannot write {path}: {e.strerror or e}") from None


def read_metadata(path) -> dict:
    """The generation parameters stored in a PNG written by flashdiff."""
    with Image.open(path) as img:
        raw = img.text.get("parameters") if hasattr(img, "text") else None
    if not raw:
        raise FlashdiffError(f"{path} has no flashdiff metadata")
    return json.loads(raw)
