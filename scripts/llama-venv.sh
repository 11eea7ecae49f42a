# Sourced by scripts/test.sh and testnet/bench.sh: makes sure $llama_venv holds
# llama-cpp-python's server, built from source for this CPU, and exports MESH_LLAMA_PYTHON.
#
# "For this CPU" is ggml's x86 feature options, set from /proc/cpuinfo, rather than
# GGML_NATIVE (-march=native): a virtual machine may list AMX while the kernel does not let a
# process use its tiles, and a native build then dies of SIGILL on its first tile instruction
# (seen on a Xeon VM: `tilezero` in libggml-cpu.so). AMX stays off; every other extension the
# CPU lists is used. The options are written next to the venv; a venv of ours built with others
# is built again. A venv named by MESH_LLAMA_VENV is the caller's: it is used as it is, and
# only installed into when it lacks the server, never removed.
llama_venv="${MESH_LLAMA_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/mesh/llama-venv}"
llama_cmake_args="-DGGML_NATIVE=OFF"
if [ "$(uname -m)" = x86_64 ] && [ -r /proc/cpuinfo ]; then
  llama_flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
  llama_has() { for f in "$@"; do [[ $llama_flags == *" $f "* ]] || return 1; done; }
  llama_has avx && llama_cmake_args+=" -DGGML_AVX=ON"
  llama_has avx2 && llama_cmake_args+=" -DGGML_AVX2=ON"
  llama_has fma && llama_cmake_args+=" -DGGML_FMA=ON"
  llama_has f16c && llama_cmake_args+=" -DGGML_F16C=ON"
  llama_has bmi2 && llama_cmake_args+=" -DGGML_BMI2=ON"
  llama_has avx_vnni && llama_cmake_args+=" -DGGML_AVX_VNNI=ON"
  llama_has avx512f avx512cd avx512vl avx512dq avx512bw && llama_cmake_args+=" -DGGML_AVX512=ON"
  llama_has avx512vbmi && llama_cmake_args+=" -DGGML_AVX512_VBMI=ON"
  llama_has avx512_vnni && llama_cmake_args+=" -DGGML_AVX512_VNNI=ON"
  llama_has avx512_bf16 && llama_cmake_args+=" -DGGML_AVX512_BF16=ON"
  llama_cmake_args+=" -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
fi
llama_stamp="$llama_venv/mesh-cmake-args"
llama_stale=0
if [ -z "${MESH_LLAMA_VENV:-}" ] && [ "$(cat "$llama_stamp" 2>/dev/null)" != "$llama_cmake_args" ]; then
  llama_stale=1
fi
if ! "$llama_venv/bin/python" -c 'import llama_cpp.server' 2>/dev/null || [ "$llama_stale" = 1 ]; then
  echo "== installing llama-cpp-python[server] into $llama_venv (builds llama.cpp, ~15 min)"
  echo "   CMAKE_ARGS=$llama_cmake_args"
  [ "$llama_stale" = 1 ] && rm -rf "$llama_venv"
  python3 -m venv "$llama_venv"
  CMAKE_ARGS="$llama_cmake_args" "$llama_venv/bin/pip" install -q --disable-pip-version-check \
    --no-cache-dir "llama-cpp-python[server]==0.3.36"
  printf '%s' "$llama_cmake_args" > "$llama_stamp"
fi
export MESH_LLAMA_PYTHON="$llama_venv/bin/python"
