"""longctx: long-context language models in JAX / Flax NNX behind one segment-recurrent interface."""

__version__ = "0.1.0"
