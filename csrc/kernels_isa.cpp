// Compiled once per instruction set; CMake defines NF_ISA (isa_generic, isa_avx2, isa_avx512) and the
// matching -m flags. Each copy exports its own kernel table.
#include "adamw.h"
#include "add_layer_norm.h"
#include "attention.h"
#include "cross_entropy.h"
#include "dropout.h"
#include "gelu.h"
#include "gemm.h"
#include "gemm_bf16.h"
#include "gemv.h"
#include "glu.h"
#include "kernel_table.h"
#include "layer_norm.h"
#include "multinomial.h"
#include "rms_norm.h"
#include "rope.h"

#define NF_STR2(x) #x
#define NF_STR(x) NF_STR2(x)

namespace nanofast {
namespace NF_ISA {

KernelTable make_table() {
  KernelTable t;
  t.isa = NF_STR(NF_ISA) + 4;  // drop the "isa_" prefix
  t.layer_norm_forward = &layer_norm_forward;
  t.layer_norm_backward = &layer_norm_backward;
  t.add_layer_norm_forward = &add_layer_norm_forward;
  t.add_layer_norm_backward = &add_layer_norm_backward;
  t.rms_norm_forward = &rms_norm_forward;
  t.rms_norm_backward = &rms_norm_backward;
  t.attention_forward = &attention_forward;
  t.attention_backward = &attention_backward;
  t.dropout_mask = &dropout_mask;
  t.dropout = &dropout;
  t.gelu_forward = &gelu_forward;
  t.gelu_backward = &gelu_backward;
  t.glu_forward = &glu_forward;
  t.glu_backward = &glu_backward;
  t.rope = &rope;
  t.adamw_step = &adamw_step;
  t.gemv = &gemv;
  t.cross_entropy_rows = &cross_entropy_rows;
  t.multinomial_from_uniform = &multinomial_from_uniform;
#if NF_HAS_GEMM_F32
  t.has_gemm_f32 = true;
  t.gemm_f32 = &gemm_f32;
#endif
#if NF_HAS_GEMM_BF16
  t.has_gemm_bf16 = true;
  t.gemm_bf16 = &gemm_bf16;
#endif
  return t;
}

const KernelTable* table() {
  static const KernelTable t = make_table();
  return &t;
}

}  // namespace NF_ISA
}  // namespace nanofast
