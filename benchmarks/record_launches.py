"""pytest plugin: record every Triton kernel launch the CPU test suite makes in Triton's interpreter, as
(kernel, argument types, constexpr values, num_warps) with the JIT's specialisation of the argument values (ints
equal to 1 as constants, 16-divisible ints and 16-byte-aligned pointers in `divisible`, see `jit_specialize.py`),
so `aot_check_all.py` can compile each one for a GPU target as the JIT would.

    TRITON_INTERPRET=1 FLOWKERN_RECORD_LAUNCHES=/tmp/launches.json \
        PYTHONPATH=benchmarks python3 -m pytest tests -m interpreter -q -p record_launches
"""
from __future__ import annotations

import inspect
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from jit_specialize import python_specialize  # noqa: E402

_records: dict[str, dict] = {}


def _record(fn, args, kwargs):
    params = inspect.signature(fn).parameters
    names = list(params)
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kwargs.items() if k in params})
    signature, constexprs, divisible = {}, {}, []
    for index, name in enumerate(names):
        annotation = str(params[name].annotation)
        value = bound.get(name, params[name].default)
        if "constexpr" in annotation or value is None:
            constexprs[name] = value if not isinstance(value, torch.dtype) else str(value)
            signature[name] = "constexpr"
            continue
        kind, key = python_specialize(value)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = key
        elif key == "D":
            divisible.append(index)
    entry = {"module": fn.__module__, "name": fn.__name__, "signature": signature, "constexprs": constexprs,
             "divisible": divisible, "num_warps": kwargs.get("num_warps", 4),
             "num_stages": kwargs.get("num_stages", 2)}
    key = json.dumps([entry["module"], entry["name"], signature, constexprs, divisible], sort_keys=True,
                     default=str)
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
