"""A BFL single-file checkpoint made from the same tiny weights gives the same image as the diffusers folder."""

import numpy as np
import pytest
from flux_reference import build_reference_pipeline
from safetensors.torch import save_file
from test_flux_transformer import _diffusers_to_bfl

from flashdiff import Pipeline
from flashdiff.engine.errors import FlashdiffError


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    pipe, path = build_reference_pipeline(root, guidance_embeds=True)
    sd = {k: v.contiguous() for k, v in pipe.transformer.state_dict().items()}
    bfl = _diffusers_to_bfl(sd, n_double=1, n_single=2, prefix="model.diffusion_model.")
    save_file(bfl, str(root / "flux1-dev.safetensors"))
    return path, root / "flux1-dev.safetensors"


def test_single_file_matches_folder(folders):
    path, single = folders
    kw = dict(steps=2, guidance=3.5, height=64, width=64, seed=3, max_sequence_length=32, progress=False)
    from_folder = Pipeline.from_pretrained(str(path), dtype="float32").generate("a lighthouse", **kw)[0]
    pipe = Pipeline.from_pretrained(str(single), dtype="float32", base=str(path))
    assert pipe.source.preset["name"] == "flux-dev"  # detected from guidance_in
    from_file = pipe.generate("a lighthouse", **kw)[0]
    assert np.array_equal(np.asarray(from_folder), np.asarray(from_file))
    assert from_file.info["flashdiff"]["transformer_file"].endswith("flux1-dev.safetensors")


def test_single_file_that_is_not_a_transformer_is_rejected(folders, tmp_path):
    path, _ = folders
    vae_file = next((path / "vae").glob("*.safetensors"))
    with pytest.raises(FlashdiffError, match="not a FLUX transformer checkpoint"):
        Pipeline.from_pretrained(str(vae_file), base=str(path))


def test_bad_base_folder_is_rejected(folders, tmp_path):
    _, single = folders
    with pytest.raises(FlashdiffError, match="--base"):
        Pipeline.from_pretrained(str(single), base=str(tmp_path))
