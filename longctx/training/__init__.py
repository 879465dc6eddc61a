"""The one training loop shared by every model."""

from longctx.training.trainer import StepFunctions, Trainer, token_cross_entropy
