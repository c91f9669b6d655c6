import warnings

import pytest


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    # peft and transformers warn about tiny configs and offline lookups; none of it is under test.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="session")
def bases(tmp_path_factory):
    """One tiny base directory per family (several safetensors shards each), shared by all tests."""
    from tests.helpers.lora_models import BUILDERS, save_base

    root = tmp_path_factory.mktemp("bases")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {family: save_base(family, str(root / family)) for family in BUILDERS}
