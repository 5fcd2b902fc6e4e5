"""The compiler: graph IR, op registry, checker, reference interpreter, passes, plan and code generation.

Nothing in this package runs a kernel or owns a parameter: it turns a Cell into a Plan and
Python source; seqgraph/kernels generates and launches the kernels, compiled.py runs them."""
