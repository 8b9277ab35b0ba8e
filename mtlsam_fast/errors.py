"""The CLI's error classes: the ones it reports as one line on stderr with exit status 2."""

from __future__ import annotations


class UsageError(Exception):
    """A user error (bad option, unusable file, unsafe output path): reported as a message, not a
    traceback, before anything was written."""


class MissingExtraError(UsageError, ImportError):
    """A package of the ``[cli]`` extra (scikit-learn, matplotlib, tqdm, Pillow) is not
    installed."""


def import_extra(module: str, package: str, purpose: str):
    """``importlib.import_module(module)``, or a :class:`MissingExtraError` naming the install
    command of the ``[cli]`` extra (``package`` is the PyPI name of ``module``)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(
            f"{purpose} needs {package}, which is not installed ({e}); install the CLI's "
            'dependencies with: pip install "mtlsam_fast[cli]"'
        ) from None
