"""Load the sanitizer build of the C helper in place of the installed one, when $DIRECTFLIP_NATIVE_SO
names it (`make sanitize` does): compositor._native is then that module for the whole process."""

from __future__ import annotations

import importlib.util
import os
import sys

ENV = "DIRECTFLIP_NATIVE_SO"


def load() -> str | None:
    """The path loaded, or None when $DIRECTFLIP_NATIVE_SO is unset. Call it before anything imports
    compositor._native."""
    path = os.environ.get(ENV)
    if not path:
        return None
    if "compositor._native" in sys.modules:
        raise RuntimeError(f"${ENV} is set but compositor._native was imported before it could be replaced")
    spec = importlib.util.spec_from_file_location("compositor._native", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"${ENV}={path} is not a loadable extension module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["compositor._native"] = module
    import compositor
    compositor._native = module
    return path
