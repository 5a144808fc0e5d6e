"""Developer tools that see what the Triton interpreter cannot, without a GPU: ``compile_check`` compiles
every kernel variant for sm_90a, ``kernel_stats`` reads registers, spills, ptxas warnings and the SASS of
each hot loop. Run them with ``TRITON_INTERPRET=0`` (``make compile-check``, ``make kernel-stats``)."""
