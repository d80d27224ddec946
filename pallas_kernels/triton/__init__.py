"""The Pallas kernels for GPUs, lowered through Triton, and the tiles they share (``tiles``).

``fused_chunk`` and ``fused_recurrent`` compute the whole fast-weight op; ``chunk_recurrence``
only the chunkwise form's sequential walk (``chunk_walk``). Interpret mode (``interpret=True``)
runs each of them anywhere.
"""
