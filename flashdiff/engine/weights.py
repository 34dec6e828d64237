"""Reading and writing safetensors: validated, lazy, sharded, atomic."""

import json
import os
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx

from .errors import FlashdiffError

_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
MAX_SHARD_BYTES = 5 * 1024**3


def read_safetensors_header(path: Path) -> dict:
    """Parse and validate a safetensors header; raise FlashdiffError naming the file if it is damaged."""
    path = Path(path)
    fix = f"delete {path} and download or convert it again"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise FlashdiffError(f"{path} is not a safetensors file (only {size} bytes); {fix}")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100 * 1024**2:
                raise FlashdiffError(f"{path} is truncated or not a safetensors file (header length {n}, file {size} bytes); {fix}")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise FlashdiffError(f"weights file {path} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FlashdiffError(f"{path} has a corrupt safetensors header; {fix}") from None
    if not isinstance(header, dict):
        raise FlashdiffError(f"{path} has a corrupt safetensors header; {fix}")
    data_bytes = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            count = 1
            for d in info["shape"]:
                count *= d
            expected = count * _DTYPE_SIZES.get(info["dtype"], 0)
        except (KeyError, TypeError, ValueError):
            raise FlashdiffError(f"{path}: tensor {name!r} has a malformed header entry; {fix}") from None
        if end > data_bytes:
            raise FlashdiffError(
                f"{path} is truncated: tensor {name!r} ends at byte {end} but the file holds {data_bytes} data bytes; {fix}"
            )
        if expected and end - start != expected:
            raise FlashdiffError(f"{path}: tensor {name!r} has {end - start} bytes, its shape needs {expected}; {fix}")
    return header


def load_safetensors(path) -> dict[str, mx.array]:
    """Load one file lazily (MLX reads tensor data only when it is used)."""
    read_safetensors_header(path)
    try:
        return mx.load(str(path))
    except Exception as e:  # MLX raises plain RuntimeError/ValueError on bad files
        raise FlashdiffError(f"could not read {path}: {e}; delete it and download or convert it again") from None


def safetensors_metadata(path) -> dict:
    return read_safetensors_header(path).get("__metadata__", {}) or {}


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a component folder, following a *.safetensors.index.json if present."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FlashdiffError(f"component folder {folder} does not exist")
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        try:
            index = json.loads(indexes[0].read_text())
            shards = sorted(set(index["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise FlashdiffError(f"{indexes[0]} is not a valid safetensors index; download it again") from None
        missing = [s for s in shards if not (folder / s).exists()]
        if missing:
            raise FlashdiffError(f"{folder} is missing shard(s) {missing} listed in {indexes[0].name}; download them again")
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FlashdiffError(f"no *.safetensors weights in {folder}")
    return files


def load_folder(folder) -> dict[str, mx.array]:
    weights = {}
    for f in weight_files(folder):
        weights.update(load_safetensors(f))
    return weights


def default_file_mode() -> int:
    """0o666 minus the umask: what open() would give, since mkstemp creates files 0o600."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_path(path: Path):
    """A temporary file name beside `path` (same suffix); on success it is renamed over `path`, on any
    failure removed, so `path` is never half-written."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _atomic_save(path: Path, weights: dict, metadata: dict | None):
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        mx.save_safetensors(tmp, weights, metadata=metadata or {})


def save_weights(folder, weights: dict[str, mx.array], name: str = "diffusion_pytorch_model",
                 metadata: dict | None = None, max_shard_bytes: int = MAX_SHARD_BYTES):
    """Write weights into `folder` as NAME.safetensors, or shards + NAME.safetensors.index.json.

    Each file is written to a temporary name and renamed, so an interrupted save leaves no
    half-written file under the final name.
    """
    folder = Path(folder)
    shards, current, size = [], {}, 0
    for k in sorted(weights):
        nbytes = weights[k].nbytes
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k] = weights[k]
        size += nbytes
    shards.append(current)
    meta = {"format": "mlx", **(metadata or {})}
    if len(shards) == 1:
        _atomic_save(folder / f"{name}.safetensors", shards[0], meta)
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"{name}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _atomic_save(folder / fname, shard, meta)
        for k, v in shard.items():
            weight_map[k] = fname
            total += v.nbytes
    write_json_atomic(folder / f"{name}.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def write_json_atomic(path, obj):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def read_json(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FlashdiffError(f"{path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FlashdiffError(f"{path} is not valid JSON ({e}); download it again") from None
