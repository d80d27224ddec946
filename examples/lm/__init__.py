"""The byte-level language model of ``examples/train_lm.py``, in the parts Flax's lm1b example has.

- :mod:`.input_pipeline`: the corpus, packed documents, training and validation windows.
- :mod:`.models`: ``ByteLM`` (DPFPformer, or Flax's causal softmax attention as the baseline).
- :mod:`.train`: optimiser, mesh, the jitted steps and the training loop.
- :mod:`.checkpoints`: orbax checkpoints, the run's settings saved next to them, resuming.
- :mod:`.sampling`: decoding with the recurrent cache.
- :mod:`.plotting`: the loss curve.

``examples/train_lm.py`` is the command line over these; ``examples/lm_throughput.py`` compares the
attentions' training throughput with it.
"""


class UsageError(ValueError):
    """A setting this run cannot use, found before training; the message names the flag.

    ``examples/train_lm.py`` prints it as an argparse error (one line, exit status 2).
    """
