"""The `triton` backend: the torch code generator with each fused region a generated kernel.

`triton_region_call` is handed every fused stage of a plan (forward and backward) by
seqgraph.compiler.codegen_torch. It turns the stage into a Region, asks the kernel generator
whether it can fuse it, and if so compiles the kernel and emits one call line; if not, it
returns False and the stage is emitted as torch code (the reason is kept on the stage, so
`plan()` shows it). GEMMs stay with torch (cuBLAS). Must not make planning decisions.
"""
from __future__ import annotations

from .codegen import region_from_outputs, region_supported
from .launch import compile_region


def triton_region_call(src, stage, env: dict, mask_var: str | None, live: set[int]) -> bool:
    inside = {n.id for n in stage.nodes}
    wanted = {o.id for o in stage.outputs} | (live & inside)
    outputs = [n for n in stage.nodes if n.id in wanted]
    if not outputs:
        return True  # nothing of this stage is used
    inputs = [i for i in stage.inputs if i.op != "const"]
    region = region_from_outputs(outputs, inputs, name=f"stage_{outputs[0].id}")
    ok, why = region_supported(region)
    if not ok:
        stage.why = f"not fused: {why}"
        return False
    kernel = compile_region(region)
    name = f"_kernel{len([k for k in src.globals if k.startswith('_kernel')])}"
    src.globals[name] = kernel
    src.kernels = getattr(src, "kernels", []) + [kernel]
    args = ", ".join(env.get(i.id, f"v{i.id}") for i in inputs)
    outs = ", ".join(env.get(o.id, f"v{o.id}") for o in outputs)
    ops = ", ".join(n.op for n in stage.nodes)
    src.emit(f"{outs}, = {name}([{args}])  # fused kernel: {ops}")
    return True
