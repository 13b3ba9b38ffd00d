"""The llama.cpp binding `make install` builds (Makefile, tools/llama_cpp_cpu_variants.cmake): one
CPU backend per x86-64 feature level, the best this CPU runs loaded at run time from the
binding's own folder, and never a library from the working directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")

# Variants that use AVX-512 (ggml/src/CMakeLists.txt, GGML_CPU_ALL_VARIANTS) and AVX2 without it.
AVX512_VARIANTS = {"skylakex", "cannonlake", "cascadelake", "icelake", "cooperlake", "zen4",
                   "sapphirerapids"}  # fmt: skip
AVX2_VARIANTS = {"haswell", "alderlake"}


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_best_cpu_variant_this_machine_runs_is_loaded(tmp_path):
    """The binding holds every variant; the one loaded uses this CPU's widest vectors."""
    import llama_cpp.llama_cpp as L

    libs = sorted(p.name for p in Path(L._base_path).glob("libggml-cpu-*.so"))
    assert {"libggml-cpu-x64.so", "libggml-cpu-haswell.so", "libggml-cpu-icelake.so"} <= set(
        libs
    ), f"the binding was not built with GGML_CPU_ALL_VARIANTS (make install): {libs}"
    proc = run_python(
        """
        import llama_cpp.llama_cpp as L
        from openchatkit.inference.llamacpp import cpu_backend_variant
        print(cpu_backend_variant())
        print(L.llama_print_system_info().decode())
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    variant, info = proc.stdout.split("\n", 1)
    flags = cpu_flags()
    if "avx512f" in flags:
        assert variant in AVX512_VARIANTS and "AVX512 = 1" in info, (variant, info)
    elif "avx2" in flags:
        assert variant in AVX2_VARIANTS and "AVX2 = 1" in info, (variant, info)
    else:
        assert variant in {"x64", "sse42", "sandybridge", "ivybridge", "piledriver"}, variant


def test_a_library_planted_in_the_working_directory_is_not_loaded(tmp_path):
    """ggml's own search (llama_backend_init with no backend loaded) opens every
    libggml-cpu-*.so beside the Python executable and in the working directory, so a user who
    chats from a folder holding a hostile one would run its code. The kit loads the binding's
    folder only. The control run proves the planted library would otherwise run."""
    if shutil.which("cc") is None:
        pytest.fail("a C compiler (cc) is needed to build the planted library")
    src = tmp_path / "evil.c"
    src.write_text(
        "#include <fcntl.h>\n#include <unistd.h>\n__attribute__((constructor)) static void ran(void)"
        ' { int fd = open("PLANTED_RAN", O_CREAT | O_WRONLY, 0644); if (fd >= 0) close(fd); }\n'
    )
    folder = tmp_path / "chat"
    folder.mkdir()
    subprocess.run(
        ["cc", "-shared", "-fPIC", "-o", str(folder / "libggml-cpu-evil.so"), str(src)], check=True
    )
    ours = run_python(
        """
        from openchatkit.inference.llamacpp import cpu_backend_variant
        print(cpu_backend_variant())
        """,
        folder,
    )
    assert ours.returncode == 0, ours.stderr
    assert not (folder / "PLANTED_RAN").exists()
    control = run_python(
        """
        import llama_cpp.llama_cpp as L
        L.llama_backend_init()
        """,
        folder,
    )
    assert control.returncode == 0, control.stderr
    assert (folder / "PLANTED_RAN").exists(), "the control did not load from the working directory"
