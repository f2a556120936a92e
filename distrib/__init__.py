"""distrib: pretrain, fine-tune and distil Hugging Face causal LMs on DeepSpeed ZeRO with data and tensor parallelism."""

__version__ = "0.1.0"
