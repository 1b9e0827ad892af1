"""`flowkern info` and `flowkern --version`: what a bug report needs, built from the live process without building
or launching anything."""
from __future__ import annotations

import json
import types

import pytest
import torch

import flowkern
from flowkern import info
from flowkern.__main__ import main


def test_version_flag_prints_versions_and_exits_0(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out == info.version_line()
    assert out.startswith(f"flowkern {flowkern.__version__} (torch {torch.__version__}, triton ")


def test_info_json_describes_this_process(capsys, setenv):
    setenv("FLOWKERN_AUTOTUNE", "0")
    assert main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["flowkern"] == flowkern.__version__ and data["torch"] == torch.__version__
    assert data["cuda_available"] == torch.cuda.is_available()
    assert len(data["devices"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert data["settings"]["autotune"] is False and data["environment"]["FLOWKERN_AUTOTUNE"] == "0"
    for dtype in ("bfloat16", "float16", "float32"):
        row = data["backends"][dtype]
        assert row["torch"] is None and row["auto"] in ("triton", "torch")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU answers; a GPU machine checks the device lines")
def test_info_on_cpu_names_the_reasons(capsys, setenv):
    setenv("TRITON_INTERPRET", "0")
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert "no CUDA device" in text and "auto -> torch" in text
    assert "triton no: Triton runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), not on cpu" in text
    setenv("TRITON_INTERPRET", "1")
    row = info.backends()["float32"]
    assert row["auto"] == "triton" and row["triton"] is None
    assert row["cuda"] == "the CUDA extension runs on CUDA tensors, not cpu"


def test_devices_report_name_capability_memory(monkeypatch):
    props = types.SimpleNamespace(name="NVIDIA H200", major=9, minor=0, total_memory=141 * 2**30,
                                  multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    assert info.devices() == [{"index": 0, "name": "NVIDIA H200", "capability": "9.0", "memory_gib": 141.0,
                               "multiprocessors": 132}]
    text = info.format_info(dict(info.collect(), devices=info.devices()))
    assert "cuda:0 NVIDIA H200, capability 9.0, 141.0 GiB, 132 multiprocessors" in text


def test_cuda_extension_state_without_building(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.version, "cuda", None)
    assert info.cuda_extension_state()["reason"] == "this PyTorch build has no CUDA"
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    import torch.utils.cpp_extension as cpp

    monkeypatch.setattr(cpp, "_get_build_directory", lambda name, verbose: str(tmp_path))
    state = info.cuda_extension_state()
    assert state["built"] is False and state["reason"].startswith("not built yet")
    (tmp_path / "flowkern_cuda.so").write_bytes(b"")
    assert info.cuda_extension_state()["built"] == str(tmp_path / "flowkern_cuda.so")


def test_tile_walk_choice_follows_the_triton_version_and_the_override(setenv, monkeypatch):
    """FLOWKERN_SPLIT_TILES: 'auto' splits the attention walks from Triton 3.9 on (3.6 compiles two loops with
    spills); 0/1 force one or the other; anything else is a ValueError naming the variable (info reports it)."""
    from flowkern import _config
    from flowkern.info import collect

    setenv("FLOWKERN_SPLIT_TILES", "auto")
    for version, split in [("3.6.0", False), ("3.7.1", False), ("3.9.0", True), ("3.10.0+git1a2b", True)]:
        monkeypatch.setattr("triton.__version__", version)
        assert _config.split_tiles() is split, version
        assert _config.split_tiles(before_3_9=True) is True, version   # the walks of SPLIT_BEFORE_3_9
        assert _config.tile_walks() == ("interior + edge loops" if split else
                                        "one masked loop (interior + edge loops for the walks of SPLIT_BEFORE_3_9 "
                                        "through TMA descriptors)")
    setenv("FLOWKERN_SPLIT_TILES", "0")
    assert _config.split_tiles() is False and _config.split_tiles(before_3_9=True) is False
    setenv("FLOWKERN_SPLIT_TILES", "1")
    assert _config.split_tiles() is True
    setenv("FLOWKERN_SPLIT_TILES", "two")
    with pytest.raises(ValueError, match="FLOWKERN_SPLIT_TILES='two'"):
        _config.split_tiles()
    assert collect()["settings"]["attention_tile_walks"].startswith("unknown: FLOWKERN_SPLIT_TILES")


def test_tma_choice_follows_the_device_and_the_override(setenv, monkeypatch):
    """FLOWKERN_TMA: 'auto' reads key/value tiles through TMA descriptors on CUDA devices of capability ≥ 9.0 only
    (never on the CPU or in the interpreter); 0/1 force it; anything else is a ValueError naming the variable."""
    from flowkern import _config
    from flowkern.info import collect

    setenv("FLOWKERN_TMA", "auto")
    assert _config.tma_loads("cpu") is False
    for capability, expected in [((8, 0), False), ((9, 0), True), ((10, 0), True)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        _config._has_tma.cache_clear()
        monkeypatch.setitem(_config._env, "interpret", False)
        assert _config.tma_loads("cuda:0") is expected, capability
        monkeypatch.setitem(_config._env, "interpret", True)
        assert _config.tma_loads("cuda:0") is False
    setenv("FLOWKERN_TMA", "1")
    assert _config.tma_loads("cpu") is True
    setenv("FLOWKERN_TMA", "0")
    monkeypatch.setitem(_config._env, "interpret", False)
    assert _config.tma_loads("cuda:0") is False
    setenv("FLOWKERN_TMA", "yes")
    with pytest.raises(ValueError, match="FLOWKERN_TMA='yes'"):
        _config.tma_loads("cpu")
    assert collect()["settings"]["attention_tile_loads"].startswith("unknown: FLOWKERN_TMA")
    _config._has_tma.cache_clear()  # no faked capability left behind
