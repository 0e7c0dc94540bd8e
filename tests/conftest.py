import pytest

from tests.fixtures.hf_reference import make_hf_model


@pytest.fixture(scope="session", params=["gemma", "gemma2"])
def hf_checkpoint(request, tmp_path_factory):
    """(folder, transformers model) for a tiny random PaliGemma 1 or 2 saved with save_pretrained."""
    model = make_hf_model(request.param)
    folder = tmp_path_factory.mktemp(f"hf-{request.param}")
    model.save_pretrained(folder)
    return folder, model
