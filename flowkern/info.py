"""`flowkern info`: what a bug report needs. Versions, devices, which backend can serve and why not, the CUDA
extension's build state and the environment settings flowkern reads. Builds nothing and launches no kernel.

    flowkern info [--json]
    flowkern --version
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import platform
import shutil
import sys

import torch

ENVIRONMENT = ("FLOWKERN_BACKEND", "FLOWKERN_NVTX", "FLOWKERN_AUTOTUNE", "FLOWKERN_VERBOSE_BUILD",
               "FLOWKERN_SPLIT_TILES", "FLOWKERN_TMA", "TRITON_INTERPRET", "TRITON_CACHE_DIR",
               "TRITON_DEFAULT_FP_FUSION", "TORCH_EXTENSIONS_DIR", "CUDA_VISIBLE_DEVICES", "CUDA_HOME")


def _version(package: str) -> str | None:
    if importlib.util.find_spec(package) is None:
        return None
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # noqa: BLE001 - found but without metadata (a source tree)
        return "unknown version"


def version_line() -> str:
    """One line: flowkern's version and the stack it runs on (`flowkern --version`)."""
    import flowkern

    triton = _version("triton")
    return (f"flowkern {flowkern.__version__} (torch {torch.__version__}, triton {triton or 'not installed'}, "
            f"CUDA {torch.version.cuda or 'none'}, Python {platform.python_version()})")


def devices() -> list[dict]:
    """Every visible CUDA device: name, compute capability, memory, multiprocessors."""
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        out.append({"index": i, "name": props.name, "capability": f"{props.major}.{props.minor}",
                    "memory_gib": round(props.total_memory / 2**30, 1),
                    "multiprocessors": props.multi_processor_count})
    return out


def cuda_extension_state() -> dict:
    """Whether the CUDA extension is built (without building it), and why it cannot be where it cannot."""
    from flowkern import _cuda_ext

    state = {"sources": _cuda_ext.csrc_dir(), "built": None, "reason": None}
    if torch.version.cuda is None:
        state["reason"] = "this PyTorch build has no CUDA"
        return state
    if state["sources"] is None:
        state["reason"] = "no CUDA sources (csrc/ is missing from this installation)"
        return state
    try:
        from torch.utils.cpp_extension import _get_build_directory

        build = _get_build_directory("flowkern_cuda", verbose=False)
    except Exception:  # noqa: BLE001 - a private helper: other torch versions may lack it
        build = None
    libraries = glob.glob(os.path.join(build, "flowkern_cuda*.so")) if build else []
    state["built"] = libraries[0] if libraries else False
    if not libraries:
        missing = [tool for tool in ("nvcc", "ninja") if shutil.which(tool) is None and not (
            tool == "nvcc" and os.environ.get("CUDA_HOME"))]
        state["reason"] = ("not built yet: it builds on the first call with FLOWKERN_BACKEND=cuda" +
                           (f"; missing tools: {', '.join(missing)}" if missing else ""))
    return state


def backends() -> dict:
    """For the default device (CUDA if present, else the CPU) and each float dtype: which backend `auto` picks
    and, per backend, None (it can serve) or the reason it cannot."""
    from flowkern import _dispatch
    from flowkern._config import use_backend

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ext = cuda_extension_state()
    out = {"device": str(device)}
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        triton_reason = _dispatch._triton_can_serve(device, dtype)
        if device.type != "cuda":
            cuda_reason = f"the CUDA extension runs on CUDA tensors, not {device.type}"
        else:
            cuda_reason = None if ext["built"] else ext["reason"]
        with use_backend("auto"):
            auto = _dispatch.select_backend("flowkern info", device, dtype)
        out[str(dtype).replace("torch.", "")] = {"auto": auto, "triton": triton_reason, "cuda": cuda_reason,
                                                 "torch": None}
    return out


def collect() -> dict:
    """Everything `flowkern info` prints, as plain data."""
    import flowkern
    from flowkern import _config

    return {
        "flowkern": flowkern.__version__, "location": os.path.dirname(os.path.abspath(flowkern.__file__)),
        "python": sys.version.split()[0], "platform": platform.platform(),
        "torch": torch.__version__, "torch_cuda": torch.version.cuda, "cudnn": (
            torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None),
        "triton": _version("triton"), "nvtx": _version("nvtx"),
        "cuda_available": torch.cuda.is_available(), "devices": devices(),
        "backends": backends(), "cuda_extension": cuda_extension_state(),
        "settings": {"backend": _config._env["backend"], "nvtx": _config.nvtx_enabled(),
                     "autotune": _config.autotune_enabled(), "triton_interpret": _config.triton_interpreting(),
                     "attention_tile_walks": _tile_walks(), "attention_tile_loads": _tile_loads()},
        "environment": {name: os.environ[name] for name in ENVIRONMENT if name in os.environ},
    }


def _tile_walks() -> str:
    """How the attention kernels walk their tiles here (`flowkern._config.split_tiles`), or why it is unknown."""
    from flowkern import _config

    try:
        return _config.tile_walks()
    except (ValueError, ImportError) as err:
        return f"unknown: {err}"


def _tile_loads() -> str:
    """How the attention kernels read their tiles on the first CUDA device (`flowkern._config.tma_loads`; per
    call, strides and alignment decide too), or why it is unknown."""
    from flowkern import _config

    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    try:
        return "TMA descriptors where aligned" if _config.tma_loads(device) else "pointers"
    except (ValueError, RuntimeError) as err:
        return f"unknown: {err}"


def format_info(info: dict) -> str:
    lines = [f"flowkern {info['flowkern']} at {info['location']}",
             f"python {info['python']} on {info['platform']}",
             f"torch {info['torch']} (CUDA {info['torch_cuda'] or 'none'}, cuDNN {info['cudnn'] or 'none'})",
             f"triton {info['triton'] or 'not installed'}, nvtx {info['nvtx'] or 'not installed'}"]
    if info["devices"]:
        for d in info["devices"]:
            lines.append(f"cuda:{d['index']} {d['name']}, capability {d['capability']}, {d['memory_gib']} GiB, "
                         f"{d['multiprocessors']} multiprocessors")
    else:
        lines.append("no CUDA device")
    b = info["backends"]
    dtypes = ("bfloat16", "float16", "float32")
    groups = [dtypes] if all(b[d] == b[dtypes[0]] for d in dtypes) else [(d,) for d in dtypes]
    for group in groups:
        row = b[group[0]]
        lines.append(f"backends for {'/'.join(group)} on {b['device']}: auto -> {row['auto']}")
        for name in ("triton", "cuda", "torch"):
            lines.append(f"  {name:<7}{'yes' if row[name] is None else 'no: ' + row[name]}")
    ext = info["cuda_extension"]
    lines.append("CUDA extension: " + (f"built ({ext['built']})" if ext["built"] else f"not built: {ext['reason']}"))
    s = info["settings"]
    lines.append(f"settings: backend={s['backend']} nvtx={int(s['nvtx'])} autotune={int(s['autotune'])} "
                 f"triton_interpret={int(s['triton_interpret'])} attention tile walks: {s['attention_tile_walks']}, "
                 f"tile loads: {s['attention_tile_loads']}")
    env = info["environment"]
    lines.append("environment: " + (" ".join(f"{k}={v}" for k, v in env.items()) if env else "none of "
                                    + ", ".join(ENVIRONMENT[:5]) + ", ... set"))
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="versions, devices, backends and settings (for bug reports)")
    p.add_argument("--json", action="store_true", help="print the same as one JSON object")


def run(args) -> int:
    info = collect()
    print(json.dumps(info, indent=1, default=str) if args.json else format_info(info))
    return 0
