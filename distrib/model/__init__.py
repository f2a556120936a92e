"""Plain Hugging Face causal LMs: built from the config, their weights, their cost, adapters and students.

Model code knows nothing of distribution (no DeepSpeed, no process groups): parallelism is applied
afterwards by :mod:`distrib.parallel`, which passes in what it needs as plain arguments (a context to build
under, a function that gathers a partitioned parameter) or reads what the model records (the
:class:`~distrib.model.weights.WeightSource` of a model built on the meta device).

    build.py     hf_config, build_model, deferred_weights, init_weights, empty_model
    weights.py   WeightSource: each parameter's value (initial or pretrained), whole or one part of it
    flops.py     FLOPs per token, the largest matmul's shape
    trainable.py freezing, the trainable summary, optimizer groups (no peft)
    adapters.py  LoRA through peft, adapter export
    student.py   distillation students: cut from the teacher, layer maps, hidden-state projections
"""

from distrib.model.build import (  # noqa: F401 (the public API)
    attention,
    build_model,
    count_parameters,
    deferred_weights,
    depth_and_width,
    empty_model,
    hf_config,
    init_weights,
    weights_deferred,
)
from distrib.model.flops import flops_per_token, forward_flops_per_token, matmul_shape  # noqa: F401
from distrib.model.weights import (  # noqa: F401
    WEIGHT_SOURCE_ATTR,
    Part,
    WeightSource,
    initial_value,
    safetensors_keys,
)
