"""Turning what the user passes as --model into local files: presets, Hub repos, folders, single files."""

import importlib
import json
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .errors import FlashdiffError

# Diffusers pipeline class -> flashdiff family module (each defines PIPELINE_CLASSES, ALLOW_PATTERNS and PIPELINE).
FAMILIES = {
    "flux": "flashdiff.models.flux.pipeline",
    "qwen_image": "flashdiff.models.qwen_image.pipeline",
}
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class ModelSource:
    """Where a model's files are. `path` is a diffusers-layout folder (model_index.json at its root).
    For a single-file checkpoint, `transformer_file` replaces the transformer folder of `path`."""

    family: str
    path: Path
    preset: dict = field(default_factory=dict)
    transformer_file: Path | None = None


def flashdiff_home() -> Path:
    return Path(os.environ.get("FLASHDIFF_HOME", Path.home() / ".cache" / "flashdiff"))


def presets() -> dict[str, dict]:
    out = {}
    for f in resources.files("flashdiff.configs").iterdir():
        if f.name.endswith(".json"):
            p = json.loads(f.read_text())
            out[p["name"]] = p
    return out


def family_module(family: str):
    if family not in FAMILIES:
        raise FlashdiffError(f"model family {family!r} is not supported (supported: {', '.join(FAMILIES)})")
    return importlib.import_module(FAMILIES[family])


def family_of_index(index_path: Path) -> str:
    try:
        cls = json.loads(Path(index_path).read_text()).get("_class_name", "")
    except (OSError, json.JSONDecodeError) as e:
        raise FlashdiffError(f"cannot read {index_path}: {e}") from None
    for family in FAMILIES:
        if cls in family_module(family).PIPELINE_CLASSES:
            return family
    raise FlashdiffError(f"{index_path} describes a {cls!r}, which flashdiff does not run (it runs: {', '.join(FAMILIES)})")


def hub_download(repo_id: str, allow_patterns: list[str] | None = None, filename: str | None = None) -> Path:
    """Download from the Hugging Face Hub (or reuse its cache), with errors that say what to do."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        if filename:
            return Path(hf_hub_download(repo_id, filename))
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns))
    except GatedRepoError:
        raise FlashdiffError(
            f"{repo_id} is gated: accept its license on huggingface.co/{repo_id}, then log in "
            "(`hf auth login` or set HF_TOKEN)"
        ) from None
    except RepositoryNotFoundError:
        raise FlashdiffError(f"no Hugging Face repo {repo_id!r} (or it is private: log in with `hf auth login`)") from None
    except LocalEntryNotFoundError:
        raise FlashdiffError(
            f"cannot download {repo_id}: offline and not in the local Hugging Face cache. "
            "Connect to the internet, unset HF_HUB_OFFLINE, or pass a local folder."
        ) from None
    except OSError as e:
        raise FlashdiffError(f"downloading {repo_id} failed: {e}") from None


def resolve(model: str, base: str | None = None) -> ModelSource:
    """Resolve a preset name, Hub repo id, local diffusers/convert folder or single-file checkpoint."""
    if not model:
        raise FlashdiffError("no model given; pass --model with a preset name, a Hugging Face repo id or a path")
    table = presets()
    if model in table:
        preset = table[model]
        if "builder" in preset:
            mod, fn = preset["builder"].split(":")
            path = getattr(importlib.import_module(mod), fn)()
        else:
            patterns = family_module(preset["family"]).ALLOW_PATTERNS
            path = hub_download(preset["repo_id"], patterns)
        return ModelSource(preset["family"], Path(path), preset)

    p = Path(model).expanduser()
    if p.is_dir():
        if not (p / "model_index.json").exists():
            raise FlashdiffError(
                f"{p} has no model_index.json: pass a folder in the diffusers layout (or one written by `flashdiff convert`)"
            )
        return ModelSource(family_of_index(p / "model_index.json"), p, _preset_for(p / "model_index.json"))
    if p.suffix == ".safetensors" or p.is_file():
        if not p.is_file():
            raise FlashdiffError(f"checkpoint file {p} does not exist")
        return _single_file(p, base)
    if REPO_ID.match(model) and not model.startswith((".", "/")):
        index = hub_download(model, filename="model_index.json")
        family = family_of_index(index)
        path = hub_download(model, family_module(family).ALLOW_PATTERNS)
        return ModelSource(family, path, {})
    raise FlashdiffError(
        f"unknown model {model!r}: not a preset ({', '.join(sorted(table))}), an existing path, or a Hugging Face repo id"
    )


def _preset_for(index_path: Path) -> dict:
    """A converted folder records the preset it came from, so defaults (steps, guidance) carry over."""
    try:
        name = json.loads(index_path.read_text()).get("_flashdiff", {}).get("preset")
    except (OSError, json.JSONDecodeError):
        return {}
    return presets().get(name, {}) if name else {}


def _single_file(path: Path, base: str | None) -> ModelSource:
    mod = family_module("flux")
    variant = mod.single_file_variant(path)  # raises if it is not a FLUX transformer checkpoint
    preset = presets()[variant]
    if base:
        base_path = Path(base).expanduser()
        if not (base_path / "model_index.json").exists():
            raise FlashdiffError(f"--base {base_path} must be a diffusers-layout folder with text encoders, tokenizers and VAE")
    else:
        base_path = hub_download(preset["repo_id"], mod.BASE_PATTERNS)
    return ModelSource("flux", base_path, preset, transformer_file=path)
