"""Compile Triton kernels for a GPU target without a GPU, specialised exactly as the JIT would specialise a launch.

The JIT does not compile a kernel for "an int and a pointer": for each launch it makes an int argument equal to 1 a
compile-time constant (stride == 1, group == 1 fold away), marks ints divisible by 16 and pointers aligned to
16 bytes (vectorised 16-byte loads, no bounds on the unrolled remainder), and only then compiles. A compile that
treats every int as a plain i32 and every pointer as unaligned reports registers, spills and instructions that never
happen at run time. Here a launch is captured from the host launcher itself (the real argument values, CPU tensors
stand in for device ones) and specialised with the JIT's own rule:

    from jit_compile import capture_launches, compile_launch
    launches = capture_launches("attention.configs", lambda: triton_launch.attention_fwd(q, k, v, ..., spec))
    kernel = compile_launch(launches[0], config=launches[0].candidates()[0], arch=90)

Triton 3.6 and 3.9 (the rule is in `jit_specialize.py`). Needs no GPU and no driver. Importing this module removes
TRITON_INTERPRET from the environment: kernels must be decorated in compiled mode, so import it before any kernel.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from jit_specialize import specialise  # noqa: E402


def jit_function(fn) -> triton.runtime.JITFunction:
    """The JITFunction under Autotuner/Heuristics wrappers."""
    while not isinstance(fn, triton.runtime.JITFunction):
        fn = fn.fn
    return fn


@dataclasses.dataclass
class Launch:
    """One captured kernel launch: the (autotuned) kernel object, its argument values by name, and the kwargs."""
    kernel: object
    values: dict

    @property
    def name(self) -> str:
        return jit_function(self.kernel).__name__

    def candidates(self, autotune: bool = True) -> list:
        """The autotuner's configs this launch would try (after its early prune), or [None] if not autotuned."""
        configs = getattr(self.kernel, "configs", None)
        if not configs:
            return [None]
        prune = getattr(self.kernel, "early_config_prune", None)
        if prune is None:
            return list(configs)
        from flowkern import _config

        saved = _config._env.get("autotune")
        _config._env["autotune"] = autotune
        try:
            return list(prune(configs, self.values, **self.values))
        finally:
            _config._env["autotune"] = saved


class _Recorder:
    """Stands in for a kernel module attribute: `kernel[grid](*args, **kwargs)` records the call."""

    def __init__(self, kernel, sink: list):
        self.kernel, self.sink = kernel, sink

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            fn = jit_function(self.kernel)
            values = dict(zip(fn.arg_names, args))
            values.update(kwargs)
            self.sink.append(Launch(self.kernel, values))

        return call


def capture_launches(module_name: str, run) -> list[Launch]:
    """The launches `run()` (a host launcher of flowkern, called with CPU tensors) makes through the kernels of
    `flowkern.kernels.<module_name>`. Nothing is launched: the outputs stay unwritten."""
    from flowkern._fused import kernel_module

    module = kernel_module(module_name)
    sink: list[Launch] = []
    saved = {}
    for attr, value in vars(module).items():
        if isinstance(value, (triton.runtime.JITFunction, triton.runtime.Autotuner, triton.runtime.Heuristics)):
            saved[attr] = value
    try:
        for attr, value in saved.items():
            setattr(module, attr, _Recorder(value, sink))
        with torch.no_grad():
            run()
    finally:
        for attr, value in saved.items():
            setattr(module, attr, value)
    return sink


def compile_launch(launch: Launch, config=None, arch: int = 90, num_warps: int = 4, num_stages: int = 3):
    """The compiled kernel (triton CompiledKernel: .asm["cubin"], .metadata.shared) for one launch and config."""
    values = dict(launch.values)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    if config is not None:
        values.update(config.kwargs)
        options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    fn = jit_function(launch.kernel)
    for param in fn.params:  # defaults the launch left out
        if param.name not in values and param.default is not inspect.Parameter.empty:
            values[param.name] = param.default
    signature, constexprs, attrs = specialise(fn, values)
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
