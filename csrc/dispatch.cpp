// Picks the kernel table for this CPU at run time: AVX-512 with AVX512-BF16 where the CPU has it, else
// AVX-512, else AVX2, else the portable baseline. NANOFAST_ISA=generic|avx2|avx512|avx512bf16 forces
// one (tests use it to cover every path).
#ifdef NF_HAVE_X86
#include <cpuid.h>
#endif
#include <cstdlib>
#include <cstring>
#include <string>

#include "kernel_table.h"

namespace nanofast {
namespace isa_generic { const KernelTable* table(); }
#ifdef NF_HAVE_X86
namespace isa_avx2 { const KernelTable* table(); }
namespace isa_avx512 { const KernelTable* table(); }
#endif
#ifdef NF_HAVE_AVX512BF16
namespace isa_avx512bf16 { const KernelTable* table(); }
#endif

namespace {

bool cpu_has(const char* isa) {
#ifdef NF_HAVE_X86
  __builtin_cpu_init();
  if (!std::strcmp(isa, "avx512bf16")) {
    // CPUID leaf 7, subleaf 1, EAX bit 5 (asked directly: older compilers' __builtin_cpu_supports
    // does not know the name)
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    return cpu_has("avx512") && __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) && ((eax >> 5) & 1);
  }
  if (!std::strcmp(isa, "avx512"))
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma");
  if (!std::strcmp(isa, "avx2")) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return !std::strcmp(isa, "generic");
}

const KernelTable* table_for(const char* isa) {
  if (!cpu_has(isa)) return nullptr;
#ifdef NF_HAVE_AVX512BF16
  if (!std::strcmp(isa, "avx512bf16")) return isa_avx512bf16::table();
#endif
#ifdef NF_HAVE_X86
  if (!std::strcmp(isa, "avx512")) return isa_avx512::table();
  if (!std::strcmp(isa, "avx2")) return isa_avx2::table();
#endif
  if (!std::strcmp(isa, "generic")) return isa_generic::table();
  return nullptr;
}

const KernelTable* best_table() {
  for (const char* isa : {"avx512bf16", "avx512", "avx2", "generic"})
    if (const KernelTable* t = table_for(isa)) return t;
  return isa_generic::table();
}

const KernelTable* initial_table() {
  const char* forced = std::getenv("NANOFAST_ISA");
  if (forced && *forced && std::strcmp(forced, "auto"))
    if (const KernelTable* t = table_for(forced)) return t;
  return best_table();
}

const KernelTable* g_table = initial_table();

}  // namespace

const KernelTable& kernels() { return *g_table; }

bool select_isa(const char* name) {
  if (!std::strcmp(name, "auto")) {
    g_table = best_table();
    return true;
  }
  const KernelTable* t = table_for(name);
  if (!t) return false;
  g_table = t;
  return true;
}

// CPUID traps to the hypervisor in a VM, which is slow, and this runs on every matmul: the vendor is
// read once.
static bool cpu_is_intel() {
#ifdef NF_HAVE_X86
  static const bool intel = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid(0, &eax, &ebx, &ecx, &edx)) return false;
    char vendor[13] = {};
    std::memcpy(vendor, &ebx, 4);
    std::memcpy(vendor + 4, &edx, 4);
    std::memcpy(vendor + 8, &ecx, 4);
    return std::strcmp(vendor, "GenuineIntel") == 0;
  }();
  return intel;
#else
  return false;
#endif
}

bool gemm_preferred() {
  const char* forced = std::getenv("NANOFAST_GEMM");
  if (forced && *forced) return std::strcmp(forced, "0") != 0;
  // MKL, torch's float32 matmul, has AVX-512 code paths for Intel CPUs only: there it is as fast as ours
  return !cpu_is_intel();
}

bool use_gemm_f32() { return kernels().has_gemm_f32 && gemm_preferred(); }
bool use_gemm_bf16() { return kernels().has_gemm_bf16 && gemm_preferred(); }
bool use_gemv() { return gemm_preferred(); }

const char* available_isas() {
  static std::string list;
  list.clear();
  for (const char* isa : {"generic", "avx2", "avx512", "avx512bf16"})
    if (table_for(isa)) list += (list.empty() ? "" : ",") + std::string(isa);
  return list.c_str();
}

}  // namespace nanofast
