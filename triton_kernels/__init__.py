"""Triton kernels of mtlsam_fast (backend ``"triton"``, wired in by
``mtlsam_fast.ops.triton_backend``).

Modules (importing this package imports nothing else; each module imports Triton):

* ``gram``        -- persistent-grid Gram ``G @ G.T`` (K <= 64) and the fused ``A <- A - B`` + Gram
* ``elementwise`` -- combine ``w^T G (+ w2^T H)``, segmented norms, perturb, Philox noise, noise
  stats
* ``qp``          -- the batched small QP, one program per problem (fp64 interior point, early exit)
* ``fused``       -- the two-launch aggregation path (Gram -> last-program reduction + QP;
  combine -> write/update)
* ``_config``     -- launch candidates, the cached autotuner, ``pin_config`` / ``MTLSAM_TRITON_PIN``
* ``_workspace``  -- workspaces cached per (device, shape) so steps allocate nothing after warm-up
* ``aot_check``   -- ``python -m mtlsam_fast.triton_kernels.aot_check``: compile every kernel for
  sm_90 without a GPU

On a CPU-only machine the kernels run under ``TRITON_INTERPRET=1`` (set before Triton is imported).
"""
