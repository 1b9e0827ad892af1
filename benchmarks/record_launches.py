"""pytest plugin: record every Triton kernel launch the CPU test suite makes in Triton's interpreter, as
(kernel, argument types, constexpr values, num_warps), so `aot_check_all.py` can compile each one for a GPU target.

    TRITON_INTERPRET=1 FLOWKERN_RECORD_LAUNCHES=/tmp/launches.json \
        PYTHONPATH=benchmarks python3 -m pytest tests -m interpreter -q -p record_launches
"""
from __future__ import annotations

import inspect
import json
import os

import torch

_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
           torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8", torch.int8: "i8", torch.bool: "i1",
           torch.int16: "i16"}
_records: dict[str, dict] = {}


def _arg_type(value):
    if isinstance(value, torch.Tensor):
        return "*" + _DTYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    return None


def _record(fn, args, kwargs):
    params = inspect.signature(fn).parameters
    names = list(params)
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kwargs.items() if k in params})
    signature, constexprs = {}, {}
    for name in names:
        annotation = str(params[name].annotation)
        value = bound.get(name, params[name].default)
        if "constexpr" in annotation or value is None:
            constexprs[name] = value if not isinstance(value, torch.dtype) else str(value)
            signature[name] = "constexpr"
        else:
            signature[name] = _arg_type(value)
    entry = {"module": fn.__module__, "name": fn.__name__, "signature": signature, "constexprs": constexprs,
             "num_warps": kwargs.get("num_warps", 4), "num_stages": kwargs.get("num_stages", 2)}
    key = json.dumps([entry["module"], entry["name"], signature, constexprs], sort_keys=True, default=str)
    _records.setdefault(key, entry)


def pytest_configure(config):
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        try:
            _record(self.fn, args, kwargs)
        except Exception:  # noqa: BLE001 - recording must never change a test's outcome
            pass
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run


def pytest_unconfigure(config):
    path = os.environ.get("FLOWKERN_RECORD_LAUNCHES", "/tmp/flowkern_launches.json")
    with open(path, "w") as fh:
        json.dump(list(_records.values()), fh, indent=1, default=str)
