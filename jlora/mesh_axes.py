"""The device mesh's axis names and which projections are row-parallel: facts the model owns.

    AXES                  ("data", "fsdp", "tensor")   the mesh every array is placed on
    ROW_AXES              ("data", "fsdp")             a batch's rows split over these
    ROW_PARALLEL_MODULES  ("o_proj", "down_proj")      input axis over tensor, output over fsdp

Every other projection (q, k, v, gate, up, lm_head) is column-parallel: input axis over fsdp,
output over tensor. The model (`jlora.llama.use_kernels`), the kernels on a mesh
(`jlora.kernel_sharding`) and the trainer's placement (`jlora.train.sharding`) read these names
from here, so they cannot disagree. This module imports nothing.
"""

AXES = ("data", "fsdp", "tensor")
ROW_AXES = ("data", "fsdp")
ROW_PARALLEL_MODULES = ("o_proj", "down_proj")
