import pytest


@pytest.fixture(scope="module")
def model(tiny_gpt):
    return tiny_gpt
