"""detr_fast's operators. Each runs the CUDA kernel for CUDA tensors, the C++ kernel for CPU tensors, and the
reference in detr_fast.ops.reference when the extension (or that device's kernel) was not built."""
from detr_fast.ops import reference
from detr_fast.ops._ext import backends, extension_loaded, has_kernel
from detr_fast.ops.assignment import linear_assignment
from detr_fast.ops.attention import attention
from detr_fast.ops.bias_act import bias_act, relu_backward_sum
from detr_fast.ops.box import box_loss, matching_cost
from detr_fast.ops.layernorm import add_dropout_layernorm, relu_dropout
from detr_fast.ops.pool import max_pool2d_nhwc, space_to_depth
from detr_fast.ops.scale import scale_many

__all__ = ["matching_cost", "box_loss", "linear_assignment", "attention", "add_dropout_layernorm", "relu_dropout",
           "bias_act", "relu_backward_sum", "scale_many", "max_pool2d_nhwc",
           "space_to_depth",
           "reference",
           "backends", "extension_loaded", "has_kernel"]
