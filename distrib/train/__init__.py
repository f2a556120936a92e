"""The one training loop, its losses and metrics."""
