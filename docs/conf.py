"""Sphinx configuration of the dpfp-jax documentation site (`make docs`).

Sphinx with MyST-Parser (the pages are Markdown, readable on GitHub as they are) and autodoc /
autosummary / napoleon (the API pages come from the Google-style docstrings): the convention of
JAX, Flax and Optax, whose sites are built the same way.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout's packages, not an installed copy

import dpfp_jax  # noqa: E402

project = "dpfp-jax"
author = "dpfp-jax contributors"
copyright = "dpfp-jax contributors, MIT licence"
release = version = dpfp_jax.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
# Pages that are not part of the site: the folder's own README (what this is, how to build it)
# and the build output.
exclude_patterns = ["_build", "README.md"]

myst_enable_extensions = ["dollarmath", "colon_fence"]
# "## Heading" gets an anchor, so [text](page.md#heading) links resolve (and are checked).
myst_heading_anchors = 4

napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": False}
autosummary_generate = False

# Every cross-reference must resolve, except to the libraries the signatures name (JAX, Flax,
# NumPy, the standard library's typing): without intersphinx (the build needs no network) Sphinx
# cannot link them, and they are not this project's to document.
nitpicky = True
nitpick_ignore_regex = [
    # The layers' shared internals (signatures name them), not part of the public API.
    (r"py:.*", r"dpfp_jax\.core(\..*)?"),
    (r"py:.*", r"(jax|jaxlib|flax|numpy|np|jnp|optax|typing|collections|nnx|nn)(\..*)?"),
    (r"py:.*", r"(Array|ArrayLike|PRNGKey|Dtype|DTypeLike|PrecisionLike|Initializer|Callable|Sequence|Any)"),
    # A type alias of dpfp_jax.feature_maps (a name or a callable), spelled out in the docstrings.
    (r"py:.*", r"FeatureMapLike"),
]

html_theme = "furo"
html_title = f"dpfp-jax {release}"
html_static_path: list[str] = []


def skip_foreign_class_members(app, what, name, obj, skip, options):
    """Leave out a class member whose value comes from another library.

    A Flax module's attribute that defaults to, say, ``nn.relu`` or ``jnp.float32`` carries that
    object's own docstring, so autodoc would document it as if it were ours (and twice where two
    classes share the default). The attributes are described in each class's "Attributes"
    section instead.
    """
    if what == "class" and not getattr(obj, "__module__", "dpfp_jax").startswith(("dpfp_jax", "pallas_kernels")):
        return True
    return None


def setup(app):
    app.connect("autodoc-skip-member", skip_foreign_class_members)
