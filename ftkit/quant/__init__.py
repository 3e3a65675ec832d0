"""Weight formats and the engines that hold them, declared in `FORMATS` and `ENGINES` (torch-free; see
ftkit.components).

A format is a grid: `none` keeps the weights in the model's dtype (fp32 or bf16); the low-bit formats store real
codes: int8 and FP8 one byte per weight, int4 two weights per byte, with bf16 or fp32 scales; GGUF's q4_0, q4_1,
q5_0 and q8_0 in blocks of 32 with float16 scales, and its K-quants q4_k and q6_k in super-blocks of 256, as llama.cpp
quantizes them. Each names its codec
(codecs.py: grid, per-group tensors, storage, encode / decode) and the kernels that read its codes: this list is
the one place formats are declared. An engine
converts a linear layer to hold a format: `native` (ftkit's QuantLinear, whose codes QuZO trains), `bitsandbytes`
(frozen nf4/fp4/int8 bases) and `straight_through` (the first-order QAT baseline). Models are converted module by
module as they are built or loaded (convert.py), so their full-precision weights never all exist at once.
"""

from ftkit.components import Engine, Format, Hook, Registry
from ftkit.quant.bnb_options import BITSANDBYTES_SECTION

FORMATS: Registry = Registry("quant.format", [
    Format("none", "the model's own dtype (fp32 or bf16)"),
    Format("int8", "symmetric int8 codes, one byte per weight", codec=Hook("ftkit.quant.codecs:INT8"),
           kernels=("int8pack", "int_mm")),
    Format("int4", "symmetric int4 codes, two per byte", codec=Hook("ftkit.quant.codecs:INT4"), kernels=("int4pack",)),
    Format("fp8_e4m3", "float8 with 4 exponent and 3 mantissa bits", codec=Hook("ftkit.quant.codecs:FP8_E4M3"),
           kernels=("scaled_mm",)),
    Format("fp8_e5m2", "float8 with 5 exponent and 2 mantissa bits", codec=Hook("ftkit.quant.codecs:FP8_E5M2"),
           kernels=("scaled_mm",)),
    Format("q4_0", "GGUF Q4_0: blocks of 32 codes 0..15 minus 8 and a float16 scale (4.5 bits a weight)",
           codec=Hook("ftkit.quant.gguf_blocks:Q4_0"), kernels=("int4pack",), block=32),
    Format("q4_1", "GGUF Q4_1: blocks of 32 codes 0..15, a float16 scale and minimum (5 bits a weight)",
           codec=Hook("ftkit.quant.gguf_blocks:Q4_1"), kernels=("int4pack",), block=32),
    Format("q5_0", "GGUF Q5_0: blocks of 32 codes 0..31 minus 16 and a float16 scale (5.5 bits a weight)",
           codec=Hook("ftkit.quant.gguf_blocks:Q5_0"), block=32),
    Format("q8_0", "GGUF Q8_0: blocks of 32 int8 codes and a float16 scale (8.5 bits a weight)",
           codec=Hook("ftkit.quant.gguf_blocks:Q8_0"), block=32),
    Format("q4_k", "GGUF Q4_K: super-blocks of 256 with float16 d and dmin, 6-bit scales and minimums per 32, codes "
                   "0..15 (4.5 bits a weight)", codec=Hook("ftkit.quant.kquants:Q4_K"), kernels=("int4pack",), block=32,
           scales_trainable=False),
    Format("q6_k", "GGUF Q6_K: super-blocks of 256 with a float16 d, int8 scales per 16, codes 0..63 (6.56 bits a "
                   "weight in a file, 8.56 held)", codec=Hook("ftkit.quant.kquants:Q6_K"), block=16,
           scales_trainable=False),
    Format("gguf", "each linear layer in its GGUF file's own block format, codes and scales as stored (a model read "
                   "from a .gguf file); float tensors stay float", from_file=True),
])


def _check_bitsandbytes(recipe, chosen, fail) -> None:
    fmt, engine = chosen.format, chosen.engine
    if fmt.low_bit and fmt.name not in engine.formats:
        fail("quant.format", f"the bitsandbytes engine provides {', '.join(engine.formats)} (int4 is nf4 or fp4 by "
             f"quant.bitsandbytes.int4_type), not '{fmt.name}'; use quant.engine: native for it")


def _check_straight_through(recipe, chosen, fail) -> None:
    if not chosen.format.low_bit:
        fail("quant.engine", "straight_through simulates a low-bit format: set quant.format (int8, int4, fp8_*)")
    if chosen.optimizer.zeroth_order:
        fail("quant.engine", f"straight_through is the first-order baseline (full-precision master weights); "
             f"{chosen.optimizer.name} trains the low-bit weights themselves with quant.engine: native")
    if not chosen.adapter.trains_base:
        fail("quant.engine", "straight_through trains the quantized weights themselves; for an adapter over a "
             "frozen quantized base use quant.engine: native or bitsandbytes")


NATIVE = Engine("native", "ftkit's QuantLinear: real codes + scales, no full-precision copy; QuZO trains the codes",
                convert=Hook("ftkit.quant.convert:to_quant_linear"), zo_trains_weights=True,
                count=Hook("ftkit.quant.linear:count_tensor"))
BITSANDBYTES = Engine("bitsandbytes", "bitsandbytes' frozen nf4 / fp4 (int4) and LLM.int8 (int8) layers",
                      convert=Hook("ftkit.quant.bnb:to_bnb_linear"), formats=("int8", "int4"),
                      count=Hook("ftkit.quant.bnb:count_tensor"), section=BITSANDBYTES_SECTION,
                      validate=_check_bitsandbytes)
STRAIGHT_THROUGH = Engine("straight_through", "first-order QAT: full-precision master weights, quantized forward, "
                                              "rounding passed straight through",
                          convert=Hook("ftkit.quant.straight_through:to_straight_through"), fo_trains_weights=True,
                          validate=_check_straight_through)

ENGINES: Registry = Registry("quant.engine", [NATIVE, BITSANDBYTES, STRAIGHT_THROUGH])
