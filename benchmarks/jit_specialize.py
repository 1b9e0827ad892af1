"""The Triton JIT's specialisation rule for one launch's argument values, written out so that a compile for a GPU
target without a GPU sees what the JIT would see. No side effects on import (safe under Triton's interpreter).

For each argument the JIT compiles against (type, key): an int equal to 1 becomes the constant 1 (stride == 1 and
kv_group == 1 fold away), an int divisible by 16 and a pointer aligned to 16 bytes get key "D" (the compiler may
assume divisibility by 16: vectorised 16-byte accesses), floats and bools are never specialised. Triton ≥ 3.4 has
the rule in C++ (`native_specialize_impl`), used where it exists; `python_specialize` is the same rule for older
versions and for recording launches inside the interpreter.
"""
from __future__ import annotations

_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "int32": "i32",
           "int64": "i64", "uint8": "u8", "int8": "i8", "bool": "i1", "int16": "i16"}


def pointer_type(tensor) -> str:
    name = str(tensor.dtype).replace("torch.", "")
    if name not in _DTYPES:
        raise TypeError(f"unsupported tensor dtype {tensor.dtype}")
    return "*" + _DTYPES[name]


def python_specialize(value, align: bool = True):
    """(type, key) of one argument under the JIT's rule; key None for unspecialised kinds, the value for a constant."""
    if isinstance(value, bool):
        return "u1", None
    if isinstance(value, int):
        if value == 1:
            return "constexpr", 1
        kind = "i32" if -2**31 <= value < 2**31 else ("u64" if value >= 2**63 else "i64")
        return kind, "D" if value % 16 == 0 else ""
    if isinstance(value, float):
        return "fp32", None
    if hasattr(value, "data_ptr"):
        return pointer_type(value), "D" if align and value.data_ptr() % 16 == 0 else ""
    if value is None:
        return "constexpr", None
    raise TypeError(f"cannot specialise an argument of type {type(value).__name__}")


def specialize_value(value):
    """(type, key) as this Triton's JIT computes it."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend
    except ImportError:
        return python_specialize(value)
    if hasattr(value, "data_ptr"):
        pointer_type(value)  # the same error as the Python rule for dtypes no kernel takes
    return native_specialize_impl(BaseBackend, value, False, True, True)


def divisibility_attrs(index: int, key) -> dict:
    """The ASTSource `attrs` entry of argument `index` for key "D" (none otherwise)."""
    if key != "D":
        return {}
    from triton.backends.nvidia.compiler import CUDABackend

    return {(index,): CUDABackend.parse_attr(key)}


def specialise(fn, values: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for `triton.compiler.ASTSource` from every argument's value (name -> value),
    as the JIT computes them for a launch. `fn` is a JITFunction."""
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        name = param.name
        if name not in values:
            raise ValueError(f"{fn.__name__}: no value for argument {name!r}")
        value = values[name]
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
            continue
        kind, key = specialize_value(value)
        if param.do_not_specialize and kind == "constexpr" and key == 1:
            kind, key = "i32", ""
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = key
        else:
            attrs.update(divisibility_attrs(i, key))
    return signature, constexprs, attrs
