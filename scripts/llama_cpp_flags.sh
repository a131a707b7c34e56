# Sourced by the llama.cpp builds (scripts/build_llama_server.sh, scripts/build_llama_cpp_python.sh).
# llama.cpp is built for this CPU (GGML_NATIVE: -march=native), which on a CPU with AMX compiles
# ggml's AMX kernels; they crash on the first quantized matmul: a Q8_0 GGUF of the default model
# segfaulted in llama.cpp's decode on a 2-core Intel Xeon with AMX (2026-12-02), as upstream
# reports (llama.cpp#20824, "segfault in ggml_backend_amx_mul_mat"). So both builds leave AMX out
# (gcc's explicit -mno-* flags win over -march=native); AVX512 and the rest stay. BUILD_TAG
# names the builds made so in their cache folders, so that an earlier build is not reused.
case "$(uname -m)" in
  x86_64) NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" ;;
  *) NO_AMX="" ;;
esac
BUILD_TAG=noamx
CPU=$( (grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || uname -m) | sha256sum | cut -c1-12)
