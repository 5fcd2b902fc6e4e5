"""The compiler: graph IR, op registry, checker, reference interpreter, passes, plan and code generation."""
