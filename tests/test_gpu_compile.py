"""The GPU compile check's reading of machine code (``benchmarks/gpu_compile.py``): the step
loop of a kernel found in ``nvdisasm`` output and its counts. The check itself runs in a
venv of its own (``.ci/run``); this is its parser on SASS whose answer is known."""

import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_compile", ROOT / "benchmarks" / "gpu_compile.py")
gpu_compile = importlib.util.module_from_spec(_spec)
sys.modules["gpu_compile"] = gpu_compile  # its dataclasses look their module up there
_spec.loader.exec_module(gpu_compile)

# Two functions as nvdisasm -c prints them. In the scan: a set-up loop without exp2, then a
# chunk loop (.L_x_1) around a step loop (.L_x_2) of 10 instructions holding 3 MUFU.EX2 (one
# predicated), two BARs, one SHFL and two shared-memory accesses, and an exit branch forwards.
SASS = """
	.section	.text.selective_scan_fwd,"ax",@progbits
.text.selective_scan_fwd:
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0020*/               @P0 BRA `(.L_x_0) ;
.L_x_1:
        /*0030*/                   LDG.E R4, desc[UR4][R2.64] ;
.L_x_2:
        /*0040*/                   FMUL R5, R4, R3 ;
        /*0050*/                   MUFU.EX2 R6, R5 ;
        /*0060*/                   MUFU.EX2 R7, R5 ;
        /*0068*/               @P4 MUFU.EX2 R11, R5 ;
        /*0070*/                   SHFL.BFLY PT, R8, R6, 0x1, 0x1f ;
        /*0080*/                   STS [R9], R8 ;
        /*0090*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*00a0*/                   LDS R10, [R9+0x4] ;
        /*00a8*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*00b0*/              @!P1 BRA `(.L_x_2) ;
        /*00c0*/                   STG.E desc[UR4][R2.64], R10 ;
        /*00d0*/               @P2 BRA `(.L_x_1) ;
        /*00e0*/               @P3 BRA `(.L_x_3) ;
.L_x_3:
        /*00f0*/                   EXIT ;
	.section	.text.gla_fwd,"ax",@progbits
.text.gla_fwd:
.L_x_4:
        /*0000*/                   FADD R1, R1, R2 ;
        /*0010*/                   BRA `(.L_x_4);
"""


def test_the_step_loop_is_the_innermost_loop_with_the_most_exp2():
    functions = gpu_compile.parse_sass(SASS)
    assert sorted(functions) == ["gla_fwd", "selective_scan_fwd"]
    loop = gpu_compile.step_loop(functions["selective_scan_fwd"])
    assert loop == dict(instructions=10, ex2=3, bar=2, shfl=1, shared=2)
    # A function whose only loop has no exp2 has no step loop.
    assert gpu_compile.step_loop(functions["gla_fwd"]) is None
