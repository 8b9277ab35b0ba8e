"""Adapters that let other libraries use this one as their accelerated backend.

* :mod:`mtlsam_fast.integrations.torchjd` -- torchjd's ``Weighting`` / ``Aggregator`` /
  ``Scalarizer`` classes (same names, same options), for ``torchjd.autogram.Engine``,
  ``torchjd.autojac.jac_to_grad`` and the scalarized loss;
* :mod:`mtlsam_fast.integrations.libmtl` -- LibMTL weighting classes (its ``AbsWeighting``
  interface) for LibMTL's ``Trainer``;
* ``examples/lightning_mtl.py`` -- the PyTorch Lightning recipe (our optimizers need no adapter).

Each adapter imports its peer when the adapter itself is imported; importing :mod:`mtlsam_fast`
or this package imports none of them. Install a peer with its extra:
``pip install "mtlsam_fast[torchjd]"`` (``[libmtl]``, ``[lightning]``). Every method an adapter
offers is one row of the adapter's table (``torchjd.METHODS``, ``libmtl.METHODS``); see
``docs/integrations.md``.
"""
