// The Newton RNN's CPU backward pass, base variant (see common/isa.h).
#include "common/isa.h"
#define RK_ISA_LEVEL 0
#include "ops/newton/newton_rnn_cpu_bwd.inc"
