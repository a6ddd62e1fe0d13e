"""Sphinx configuration of the sklearn_transfer documentation site.

Build it (offline; warnings, broken cross-references included, are errors)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html

The gallery runs every script of ``examples/`` during the build.
"""

import os
import pkgutil
import re
import sys
from pathlib import Path

from sphinx.util import logging

ROOT = Path(__file__).resolve().parents[1]
# document (and run the examples on) this checkout, whatever copy is installed
sys.path.insert(0, str(ROOT))

import sklearn_transfer  # noqa: E402

project = "sklearn_transfer"
author = "the sklearn_transfer developers"
copyright = "the sklearn_transfer developers"
version = release = sklearn_transfer.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
templates_path = ["_templates"]
exclude_patterns = ["_build", "auto_examples/*.ipynb", "auto_examples/*.py",
                    "auto_examples/*.zip", "auto_examples/*.json"]

# -- API reference: autosummary pages from the docstrings ----------------------
autosummary_generate = True
autosummary_ignore_module_all = False  # a module page lists its __all__
# module pages point to, rather than repeat, what sklearn_transfer itself exports
autosummary_context = {"toplevel": sorted(sklearn_transfer.__all__)}
# the types are in the numpydoc "Parameters" sections; annotations would repeat them
autodoc_typehints = "none"
# an override without a docstring of its own (skorch's hooks) stays out of the reference
autodoc_inherit_docstrings = False
numpydoc_show_class_members = False  # the class template lists the members

# -- cross-references: every one must resolve ----------------------------------
nitpicky = True
# No intersphinx: the build is offline. References to other libraries stay plain text.
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|torchvision|timm|skorch|sklearn|numpy|np|PIL|pyarrow|dask|distributed"
               r"|fsspec|openvino|skops|safetensors|joblib|tqdm|simplejpeg|sqlite3|os|pathlib"
               r"|collections|typing|concurrent)\..*"),
]

# -- pages written in Markdown (MyST) ---------------------------------------------
myst_heading_anchors = 3  # [text](page.md#a-heading) links, as on GitHub

# -- gallery: examples/*.py, run at build time -----------------------------------
sphinx_gallery_conf = {
    "examples_dirs": str(ROOT / "examples"),
    "gallery_dirs": "auto_examples",
    # every example runs, not only plot_*.py: they are named for what they do
    "filename_pattern": r"\.py$",
    "doc_module": ("sklearn_transfer",),
    "backreferences_dir": "gen_modules/backreferences",
    "reference_url": {"sklearn_transfer": None},
    "download_all_examples": False,
    "within_subsection_order": "FileNameSortKey",
}
# the few-shot example reads the real datasets where the tests do
os.environ.setdefault("SKLEARN_TRANSFER_DATA", str(ROOT.parent / "shared" / "data"))

# -- HTML ---------------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"sklearn_transfer {release}"
html_theme_options = {
    "navbar_align": "left",
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
}
html_show_sourcelink = False


def check_api_lists(app):
    """Warn (an error under -W) of a public name or module that api.rst does not list."""
    listed = set(re.findall(r"^\s{3}(\S+)\s*$", Path(app.srcdir, "api.rst").read_text(), re.M))
    public = {name for name in sklearn_transfer.__all__ if not name.startswith("_")}
    public |= {m.name for m in pkgutil.iter_modules(sklearn_transfer.__path__)
               if not m.name.startswith("_")}
    for name in sorted(public - listed):
        logging.getLogger(__name__).warning(f"{name} is public but docs/api.rst does not list it")


def resolve_as_python_would(app, env, node, contnode):
    """Resolve a name in a docstring as Python would in the module that defines the object.

    What ``sklearn_transfer`` exports is documented there only (``sklearn_transfer.extract_codes``,
    not ``sklearn_transfer.extract.extract_codes``), so ``:func:`extract_codes``` written in
    ``extract.py``, or ``:class:`WeightEMA``` in ``FineTunedClassifier``'s docstring, needs this.
    An attribute listed in a numpydoc "Attributes" section has no target: its class is linked.
    """
    if node.get("refdomain") != "py":
        return None
    target, module, cls = node["reftarget"], node.get("py:module") or "", node.get("py:class")
    if cls and module == "sklearn_transfer":  # a re-exported class: look in its own module
        module = getattr(sklearn_transfer, cls.split(".")[0]).__module__
    if target.startswith("sklearn_transfer."):  # sklearn_transfer.extract.x -> sklearn_transfer.x
        names = [target, "sklearn_transfer." + target.split(".", 2)[-1]]
    else:
        names = [f"{module}.{target}", f"sklearn_transfer.{target}"]
    tries = [(node["reftype"], name) for name in names]
    if node["reftype"] == "attr":
        owners = [name.rpartition(".")[0] for name in names] if "." in target else [
            f"{module}.{cls}", f"sklearn_transfer.{cls}"]
        tries += [("class", owner) for owner in owners]
    py = env.get_domain("py")
    for reftype, name in tries:
        found = py.resolve_xref(env, node["refdoc"], app.builder, reftype, name, node, contnode)
        if found is not None:
            return found
    return None


def skip_metadata_requests(app, what, name, obj, skip, options):
    """Leave out scikit-learn's generated ``set_*_request`` methods (documented by scikit-learn)."""
    return True if re.fullmatch(r"set_\w+_request", name) else None


def setup(app):
    app.connect("builder-inited", check_api_lists)
    app.connect("autodoc-skip-member", skip_metadata_requests)
    app.connect("missing-reference", resolve_as_python_would)
