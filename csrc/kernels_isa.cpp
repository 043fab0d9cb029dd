// Compiled once per instruction set; CMake defines NF_ISA (isa_generic, isa_avx2, isa_avx512) and the
// matching -m flags. Each copy exports its own kernel table.
#include "kernel_table.h"
#include "layer_norm.h"
#include "add_layer_norm.h"
#include "attention.h"
#include "gelu.h"
#include "adamw.h"
#include "dropout.h"
#include "gemm.h"
#include "gemm_bf16.h"

#define NF_STR2(x) #x
#define NF_STR(x) NF_STR2(x)

namespace nanofast {
namespace NF_ISA {

const KernelTable* table() {
  static const KernelTable t = {
      NF_STR(NF_ISA) + 4,  // drop the "isa_" prefix
      &layer_norm_forward, &layer_norm_backward, &attention_forward, &attention_backward, &gelu_forward, &gelu_backward,
      &dropout_mask, &add_layer_norm_forward, &add_layer_norm_backward, &adamw_step, &dropout, &gemm_f32, &gemm_bf16,
  };
  return &t;
}

}  // namespace NF_ISA
}  // namespace nanofast
