"""The kernel backends: the torch code generator with each fused region a generated kernel.

`triton_region_call` (the `triton` backend) and `cpu_region_call` (the `cpu` backend, C
kernels) are handed every fused stage of a plan (forward and backward) by
seqgraph.compiler.codegen_torch. Each turns the stage into a Region, asks its kernel generator
whether it can fuse it, and if so compiles the kernel and emits one call line; if not, it
returns False and the stage is emitted as torch code (the reason is kept on the stage, so
`plan()` shows it). The kernel writes the stage's stores itself: saved values straight into
their (T, B, ...) buffers, outputs zeroed and states carried on padded rows, so no copy or
`where` follows it. GEMMs are not regions: torch runs them here (cuBLAS, MKL), and the cpu
backend's whole C loops call MKL or seqgraph's GEMM (c_loops.py). Must not make planning
decisions.
"""
from __future__ import annotations

from .codegen import region_from_outputs, region_supported


def _stage_region(stage, live: set[int], stores: list):
    """The Region of a fused stage, with what its call must pass and bind (or None when nothing
    of the stage is used)."""
    inside = {n.id for n in stage.nodes}
    mine = [st for st in stores if st.node.id in inside and not st.done]
    wanted = {o.id for o in stage.outputs} | (live & inside)
    plain = {}
    for st in mine:
        if st.mode == "plain" and st.node.id not in plain:
            plain[st.node.id] = st  # the node's own value is written straight into this buffer
    primary = [n for n in stage.nodes if n.id in wanted or n.id in plain]
    if not primary and not mine:
        return None
    inputs = [i for i in stage.inputs if i.op != "const"]
    outputs, targets, carry, zero = list(primary), [plain[n.id].target if n.id in plain else None for n in primary], {}, set()
    extra = [st for st in mine if plain.get(st.node.id) is not st]
    for st in extra:
        k = len(outputs)
        outputs.append(st.node)
        targets.append(st.target)
        if st.mode == "zero":
            zero.add(k)
        elif st.mode == "carry":
            if st.prev not in inputs:
                inputs.append(st.prev)
            carry[k] = inputs.index(st.prev)
    region = region_from_outputs(outputs, inputs, carry=carry, zero_masked=zero, name=f"stage_{outputs[0].id}")
    return region, inputs, primary, targets, mine, plain, extra


def _emit_kernel_call(src, stage, env, name: str, kernel, call: str, wiring) -> None:
    region, inputs, primary, targets, mine, plain, extra = wiring
    src.globals[name] = kernel
    args = ", ".join(env.get(i.id, f"v{i.id}") for i in inputs)
    names = [env.get(n.id, f"v{n.id}") for n in primary]
    for st in extra:
        names.append(st.result or "_")
    outs_arg = ", ".join(t or "None" for t in targets)
    masked = bool(region.carry or region.zero_masked)
    line = f"{call}([{args}]" + (", mask=mt" if masked else "") + (f", out=[{outs_arg}]" if any(targets) else "") + ")"
    ops = ", ".join(n.op for n in stage.nodes)
    src.emit(f"{', '.join(names)}, = {line}  # fused kernel: {ops}")
    for st in mine:
        st.done = True
        if st in plain.values() and st.result is not None:
            src.emit(f"{st.result} = {env.get(st.node.id, f'v{st.node.id}')}")


def triton_region_call(src, stage, env: dict, mask_var: str | None, live: set[int], stores: list) -> bool:
    from .launch import compile_region
    wiring = _stage_region(stage, live, stores)
    if wiring is None:
        return True  # nothing of this stage is used
    ok, why = region_supported(wiring[0])
    if not ok:
        stage.why = f"not fused: {why}"
        return False
    name = f"_kernel{len([k for k in src.globals if k.startswith('_kernel')])}"
    _emit_kernel_call(src, stage, env, name, compile_region(wiring[0]), name, wiring)
    return True


def cpu_region_call(src, stage, env: dict, mask_var: str | None, live: set[int], stores: list) -> bool:
    """Like triton_region_call, with C kernels gathered into the program's one CLibrary
    (`src.globals["_clib"]`, built by the caller once generation is done)."""
    from .c_codegen import c_region_supported
    from .c_launch import CLibrary
    wiring = _stage_region(stage, live, stores)
    if wiring is None:
        return True
    ok, why = c_region_supported(wiring[0])
    if not ok:
        stage.why = f"not fused: {why}"
        return False
    lib = src.globals.setdefault("_clib", CLibrary())
    kernel = lib.add(wiring[0])
    name = f"_ck{lib.kernels.index(kernel)}"
    _emit_kernel_call(src, stage, env, name, kernel, f"{name}.fast", wiring)
    return True


def _hoisted_call(src, stage, kernels) -> str | None:
    """A stage of Plan.hoisted_regions() as a HoistedRegion (hoisted.py) of `kernels`: its
    global name, or None (with the reason on the stage) where the kernels cannot fuse it."""
    from .hoisted import HoistedRegion, NotFused
    name = f"_hoisted{len([k for k in src.globals if k.startswith('_hoisted')])}"
    try:
        src.globals[name] = HoistedRegion(stage, f"hoisted_{stage.outputs[0].id}", kernels)
    except NotFused as e:
        stage.why = f"not fused: {e}"
        return None
    return name


def cpu_hoisted_call(src, stage) -> str | None:
    """_hoisted_call with C kernels in the program's CLibrary, built with its first part."""
    import torch

    from .c_codegen import c_region_supported
    from .c_launch import CLibrary
    from .hoisted import KernelMaker
    lib = src.globals.setdefault("_clib", CLibrary())
    kernels = KernelMaker(c_region_supported, lambda region: lib.add(region, prologue=True).fast,
                          (torch.float32, torch.float64), lambda device: device.type == "cpu")
    return _hoisted_call(src, stage, kernels)


def triton_hoisted_call(src, stage) -> str | None:
    """_hoisted_call with Triton kernels (CUDA tensors, or CPU ones under TRITON_INTERPRET=1)."""
    import torch

    from ..settings import triton_interpreting
    from .hoisted import KernelMaker
    from .launch import compile_region
    kernels = KernelMaker(region_supported, compile_region, (torch.float32, torch.float16, torch.bfloat16),
                          lambda device: device.type == "cuda" or (device.type == "cpu" and triton_interpreting()))
    return _hoisted_call(src, stage, kernels)
