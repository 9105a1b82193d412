"""The vLLM plugin's guards and the engine arguments it changes, without starting vLLM: it
refuses a vLLM it was not written against (a silently unapplied fix would bring the engine-killing
bug back), the versions it accepts are the locks' versions, the CPU dtype follows the CPU's bf16
flags, and the grouped kernel needs no spare LoRA slot while vLLM's own ops do."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import ivonserve.vllm_plugin as plugin
from ivonserve.config import Settings, repo_root
from ivonserve.engine import build_engine_args, default_cpu_dtype
from ivonserve.pool import PreparedPool
from ivonserve.vllm_plugin import seeds


def _locked_vllm_versions() -> set[str]:
    found = set()
    for lock in (repo_root() / "requirements").glob("*.lock"):
        found |= set(re.findall(r"^vllm(?:-cpu)?==([\w.]+)", lock.read_text(), re.MULTILINE))
    return found


def test_the_plugin_accepts_exactly_the_locked_vllm_versions():
    assert set(plugin.SUPPORTED_VLLM) == _locked_vllm_versions()


def test_an_unsupported_vllm_is_refused_with_the_versions_named(monkeypatch):
    import vllm

    monkeypatch.setattr(plugin, "_applied", {})
    monkeypatch.setattr(vllm, "__version__", "0.99.0")
    with pytest.raises(plugin.PluginError, match=r"0\.32\.0 or 0\.33\.0.*not 0\.99\.0"):
        plugin.register()


def test_the_seed_fix_refuses_when_vllms_rewind_moved(monkeypatch):
    import vllm.v1.worker.cpu_model_runner  # noqa: F401  (imported before getsource is faked)
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    real = seeds.inspect.getsource
    moved = GPUModelRunner._bookkeeping_sync

    def getsource(obj):  # a vLLM whose rewind is written differently
        return "gen.set_state(saved)" if obj is moved else real(obj)

    monkeypatch.setattr(seeds.inspect, "getsource", getsource)
    with pytest.raises(plugin.PluginError, match="no longer rewinds"):
        seeds.apply()


def test_an_unknown_lora_kernel_is_refused(monkeypatch):
    monkeypatch.setattr(plugin, "_applied", {})
    monkeypatch.setattr(seeds, "apply", lambda: "rewind-by-state")  # leave this process alone
    monkeypatch.setenv(plugin.LORA_KERNEL_ENV, "fast")
    with pytest.raises(plugin.PluginError, match="IVONSERVE_LORA_KERNEL='fast'"):
        plugin.register()


@pytest.mark.parametrize(
    ("flags", "dtype"),
    [
        ("fpu sse2 avx avx2 fma f16c", "float32"),  # AVX2 only: bf16 would be emulated
        ("avx2 avx512f avx512_bf16", "bfloat16"),
        ("avx2 amx_tile amx_bf16", "bfloat16"),
    ],
)
def test_the_cpu_dtype_follows_native_bf16_flags(tmp_path, flags, dtype):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert default_cpu_dtype(cpuinfo) == dtype


def test_no_cpuinfo_means_float32(tmp_path):
    assert default_cpu_dtype(tmp_path / "absent") == "float32"


def _pool(name: str, draws: int) -> PreparedPool:
    return PreparedPool(
        name=name, posterior_dir=Path(name), seed=0, rank=8, target_modules=["q_proj", "v_proj"],
        mean_dir=Path(name), draw_dirs=[Path(f"{name}-{k}") for k in range(draws)],
    )  # fmt: skip


@pytest.mark.parametrize(("kernel", "spare"), [("grouped", 0), ("vllm", 1)])
def test_lora_slots_are_every_draw_and_mean_plus_a_spare_only_for_vllms_ops(kernel, spare):
    config = Settings(lora_kernel=kernel, dtype="float32").engine_config()
    args = build_engine_args(config, Path("model"), [_pool("a", 8), _pool("b", 4)], cpu=True)
    assert args["max_loras"] == args["max_cpu_loras"] == (8 + 1) + (4 + 1) + spare
    assert args["lora_target_modules"] == ["q_proj", "v_proj"] and args["max_lora_rank"] == 8


def test_the_compiled_lora_path_refuses_a_cpu_platform_it_was_not_written_against(monkeypatch):
    from vllm.platforms.cpu import CpuPlatform

    from ivonserve.vllm_plugin import punica

    other = "vllm.lora.punica_wrapper.punica_cpu.AnotherWrapper"
    monkeypatch.setattr(CpuPlatform, "get_punica_wrapper", classmethod(lambda cls: other))
    with pytest.raises(plugin.PluginError, match="AnotherWrapper"):
        punica.apply()
    # vLLM's wrapper, but its configuration no longer turns compilation off for LoRA that way
    monkeypatch.setattr(
        CpuPlatform, "get_punica_wrapper", classmethod(lambda c: punica.VLLM_QUALNAME)
    )
    monkeypatch.setattr(punica.inspect, "getsource", lambda obj: "def check_and_update_config")
    with pytest.raises(plugin.PluginError, match="needs review"):
        punica.apply()


def test_vllms_cpu_configuration_runs_as_for_a_model_without_lora_and_keeps_the_lora_config(
    monkeypatch,
):
    from types import SimpleNamespace

    from ivonserve.vllm_plugin import punica

    seen = []

    def check(cls, config):  # vLLM's CpuPlatform.check_and_update_config
        seen.append(config.lora_config)
        if len(seen) == 2:
            raise ValueError("a bad config")

    compiling = punica._compiling_lora(check)
    config = SimpleNamespace(lora_config="the LoRA config")
    compiling(None, config)
    assert seen == [None] and config.lora_config == "the LoRA config"
    with pytest.raises(ValueError, match="a bad config"):
        compiling(None, config)
    assert config.lora_config == "the LoRA config"  # restored when vLLM refuses the config too
    # an engine of vLLM's own ops (in a process that also ran grouped ones) keeps vLLM's path
    monkeypatch.setenv(plugin.LORA_KERNEL_ENV, "vllm")
    seen.clear()
    compiling(None, config)
    assert seen == ["the LoRA config"]
