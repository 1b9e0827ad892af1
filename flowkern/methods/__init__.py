"""Training methods (loss and targets only), registered by name and imported lazily.

    fm   flow matching (the teacher)            flowkern.methods.flow_matching:FlowMatching
    pd   progressive distillation               flowkern.methods.progressive_distillation:ProgressiveDistillation
    cd   consistency distillation               flowkern.methods.consistency_distillation:ConsistencyDistillation
    ct   consistency training (iCT / ECT)       flowkern.methods.consistency_training:ConsistencyTraining
    ctm  consistency trajectory model           flowkern.methods.ctm:CTM
    meanflow  MeanFlow (one-step, from data)    flowkern.methods.meanflow:MeanFlow
    sct  continuous-time consistency training   flowkern.methods.scm:SCT
    scd  continuous-time consistency distill.   flowkern.methods.scm:SCD
    shortcut  shortcut model                    flowkern.methods.shortcut:Shortcut
    lsd  Lagrangian self-distillation           flowkern.methods.self_distillation:LagrangianSelfDistillation
    esd  Eulerian self-distillation             flowkern.methods.self_distillation:EulerianSelfDistillation
    psd  progressive self-distillation          flowkern.methods.self_distillation:ProgressiveSelfDistillation
    f2d2 joint flow map and log-density (F2D2)  flowkern.methods.f2d2:F2D2
"""
from __future__ import annotations

import importlib

from flowkern.methods.base import Auxiliary, Method
from flowkern.methods.parameters import RUN_VALUES

METHODS: dict[str, str] = {
    "fm": "flowkern.methods.flow_matching:FlowMatching",
    "pd": "flowkern.methods.progressive_distillation:ProgressiveDistillation",
    "cd": "flowkern.methods.consistency_distillation:ConsistencyDistillation",
    "ct": "flowkern.methods.consistency_training:ConsistencyTraining",
    "ctm": "flowkern.methods.ctm:CTM",
    "meanflow": "flowkern.methods.meanflow:MeanFlow",
    "sct": "flowkern.methods.scm:SCT",
    "scd": "flowkern.methods.scm:SCD",
    "shortcut": "flowkern.methods.shortcut:Shortcut",
    "lsd": "flowkern.methods.self_distillation:LagrangianSelfDistillation",
    "esd": "flowkern.methods.self_distillation:EulerianSelfDistillation",
    "psd": "flowkern.methods.self_distillation:ProgressiveSelfDistillation",
    "f2d2": "flowkern.methods.f2d2:F2D2",
}


def method_names() -> list[str]:
    """Every registered method name (importable or not)."""
    return list(METHODS)


def get_method(name: str) -> type[Method]:
    """The Method subclass registered as `name`; ValueError for an unknown name, ImportError if its module is
    missing."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    module_name, attr = METHODS[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is not None and module_name.startswith(err.name):
            raise ImportError(f"method {name!r} is registered but its module {module_name} is not available "
                              f"in this installation") from err
        raise
    cls = getattr(module, attr, None)
    if cls is None:
        raise ImportError(f"method {name!r}: module {module_name} has no class {attr}")
    return cls


__all__ = ["METHODS", "RUN_VALUES", "Auxiliary", "Method", "get_method", "method_names"]
