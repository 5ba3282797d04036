"""The project's test settings do what they say: a warning raised from icons_hf's own code fails the test
(pyproject.toml, ``filterwarnings``), while the libraries' own notices do not."""

import warnings

import pytest


def warn_from(module: str, category: type[Warning]) -> list:
    """Raise ``category`` from code whose module is ``module`` (as the warnings machinery attributes it); return
    what was recorded under the session's filters."""
    code = compile("import warnings\nwarnings.warn('deliberate', category)\n", module.replace(".", "/") + ".py", "exec")
    with warnings.catch_warnings(record=True) as seen:  # keeps the active filters; only records what they let out
        exec(code, {"__name__": module, "category": category})
    return [w for w in seen if str(w.message) == "deliberate"]


@pytest.mark.parametrize("module", ["icons_hf", "icons_hf.gradients.extractor", "icons_hf.demo"])
@pytest.mark.parametrize("category", [UserWarning, RuntimeWarning, DeprecationWarning, FutureWarning])
def test_a_warning_from_icons_hf_fails_the_test(module, category):
    with pytest.raises(category, match="deliberate"):
        warn_from(module, category)


@pytest.mark.parametrize(
    "module, category, shown",
    [
        ("transformers.trainer", UserWarning, True),
        ("icons_hf_extension", UserWarning, True),  # another package whose name starts alike
        ("torch.nn.modules.module", DeprecationWarning, False),
        ("datasets.arrow_dataset", FutureWarning, False),
    ],
)
def test_other_libraries_warnings_do_not_fail(module, category, shown):
    assert len(warn_from(module, category)) == int(shown)
