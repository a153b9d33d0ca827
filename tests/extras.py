"""Optional integrations (timm, torchvision, transformers) in tests.

``require("timm")`` imports and returns the module. When it is not installed the test
skips, saying which extra provides it, unless ``FUSEDGRAD_REQUIRE_EXTRAS=1``: CI sets
that on the stack where it installs the extras, so a broken install fails there
instead of turning into a silent skip.
"""

import importlib
import os

import pytest

# module -> the pip extra of fusedgrad that installs it
EXTRA_OF = {"timm": "models", "torchvision": "models", "transformers": "transformers"}


def require(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = EXTRA_OF.get(module, "?")
        msg = f"{module} is not installed (pip install -e '.[{extra}]'): {exc}"
        if os.environ.get("FUSEDGRAD_REQUIRE_EXTRAS") == "1":
            pytest.fail(f"FUSEDGRAD_REQUIRE_EXTRAS=1 but {msg}")
        pytest.skip(msg)
