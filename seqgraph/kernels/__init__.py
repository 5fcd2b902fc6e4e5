"""The kernels of the compiled backends: Triton (codegen.py, launch.py) and C for the CPU
(c_codegen.py, c_loops.py, c_launch.py, cpu_gemm.py), generated from the fused regions and
loops of a compiled plan. Nothing here decides what is fused or saved: that is the plan's."""
