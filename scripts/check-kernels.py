#!/usr/bin/env python3
"""Compiles the CUDA kernels (src/ops/cuda/*.cu, as the binary does at run time) with NVRTC on a
machine without a GPU, and with ptxas (if found) prints each kernel's registers, spills and shared
memory: compile errors and register spills show up before a GPU run.

    NVRTC_LIB=.../libnvrtc.so.13 PTXAS=.../ptxas python3 scripts/check-kernels.py [--arch sm_90]

Without NVRTC_LIB, libnvrtc is looked for in the Python environment's nvidia/cu*/lib folders (the
`nvidia-cuda-nvrtc` wheel that torch installs); without PTXAS, on PATH and in triton's folder.
"""
import argparse
import ctypes
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The order the binary concatenates them in (src/ops/cuda/mod.rs, Kernels::compile).
SOURCES = ["common.cu", "softmax.cu", "elementwise.cu", "flash.cu", "flash_hopper.cu"]


def find(env, patterns):
    if os.environ.get(env):
        return os.environ[env]
    site = sysconfig.get_paths()["purelib"]
    for pattern in patterns:
        hits = sorted(glob.glob(os.path.join(site, pattern)))
        if hits:
            return hits[-1]
    return None


def compile_ptx(arch, defines=()):
    """PTX of all kernels for `arch` (sm_XY or sm_90a), as the binary compiles them; exits with
    NVRTC's log on an error."""
    lib_path = find("NVRTC_LIB", ["nvidia/cu*/lib/libnvrtc.so*", "nvidia/cuda_nvrtc/lib/libnvrtc.so*"])
    if not lib_path:
        sys.exit("libnvrtc not found: set NVRTC_LIB (e.g. pip install nvidia-cuda-nvrtc)")
    nvrtc = ctypes.CDLL(lib_path)
    source = "\n".join(open(os.path.join(ROOT, "src/ops/cuda", f)).read() for f in SOURCES)
    program = ctypes.c_void_p()
    if nvrtc.nvrtcCreateProgram(ctypes.byref(program), source.encode(), b"kernels.cu", 0, None, None):
        sys.exit("nvrtcCreateProgram failed")
    compute = arch.replace("sm_", "compute_")
    flags = [f"--gpu-architecture={compute}"] + [f"-D{d}" for d in defines]
    options = (ctypes.c_char_p * len(flags))(*[f.encode() for f in flags])
    status = nvrtc.nvrtcCompileProgram(program, len(flags), options)
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(program, log)
    if log.value.strip():
        print(log.value.decode())
    if status:
        sys.exit(f"NVRTC failed ({status})")
    nvrtc.nvrtcGetPTXSize(program, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetPTX(program, ptx)
    print(f"NVRTC ({lib_path}): {size.value} bytes of PTX for {compute}")
    return ptx.value


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="sm_90a")
    args = parser.parse_args()
    ptx = compile_ptx(args.arch)

    ptxas = os.environ.get("PTXAS") or shutil.which("ptxas") or find("PTXAS", ["triton/backends/nvidia/bin/ptxas"])
    if not ptxas:
        print("ptxas not found (set PTXAS): registers and spills not reported")
        return
    text = ptx.decode()
    version = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout
    # An older ptxas rejects a newer PTX ISA version line; the kernels use nothing newer than 8.0.
    if "release 12." in version:
        text = re.sub(r"^\.version \d+\.\d+", ".version 8.0", text, flags=re.M)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernels.ptx")
        open(path, "w").write(text)
        run = subprocess.run([ptxas, f"-arch={args.arch}", "-v", path, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    if run.returncode:
        sys.exit(run.stderr)
    kernel = None
    for line in run.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            kernel = m.group(1)
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and kernel:
            spills = f"spills {m.group(1)}/{m.group(2)} B" if m.group(1) != "0" else "no spills"
        m = re.search(r"Used (\d+) registers.*?(?:(\d+) bytes smem)?$", line)
        if m and kernel:
            smem = f", {m.group(2)} B static shared" if m.group(2) else ""
            print(f"{kernel:<28} {m.group(1):>3} registers, {spills}{smem}")
            kernel = None


if __name__ == "__main__":
    main()
