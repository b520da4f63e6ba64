"""pyproject.toml's filterwarnings: a deprecation reported at a call in tldr_jax fails a test,
one reported inside a library stays quiet (the libraries' own we cannot change)."""

import warnings

import pytest


def _warn(category: type[Warning], module: str) -> None:
    filename = module.replace(".", "/") + ".py"
    warnings.warn_explicit("deprecated", category, filename, 1, module=module)


@pytest.mark.parametrize("category", [DeprecationWarning, PendingDeprecationWarning, FutureWarning])
@pytest.mark.parametrize("module", ["tldr_jax", "tldr_jax.train.state"])
def test_deprecation_reported_in_tldr_jax_is_an_error(category, module):
    with pytest.raises(category):
        _warn(category, module)


@pytest.mark.parametrize("module", ["optax._src.linear_algebra", "importlib._bootstrap"])
def test_library_internal_deprecation_is_ignored(module):
    with warnings.catch_warnings(record=True) as seen:
        _warn(DeprecationWarning, module)
    assert seen == []
