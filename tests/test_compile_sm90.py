"""The compiled (non-interpreted) kernels build for sm_90 with the installed Triton.

The rest of the CPU suite runs the kernels in the interpreter, which never compiles them;
this runs tests/sm90_compile.py in a subprocess with the interpreter off.
"""
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("sm90_compile.py")


def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True,
                          timeout=600)
    report = done.stdout + done.stderr
    assert done.returncode == 0, report
    assert "compiled" in report and " 0 failed" in report, report


def test_narrow_address_products_are_found():
    """The TTIR check flags a 32-bit multiply that reaches an address, through a widening,
    and nothing in 64-bit arithmetic or in values that never reach an address."""
    sys.path.insert(0, str(SCRIPT.parent))
    from sm90_compile import narrow_products_in_addresses

    ttir = """
    %pid = tt.get_program_id x : i32 loc(#loc1)
    %r = arith.muli %pid, %c8_i32 : i32 loc(#loc2)
    %r_0 = arith.extsi %r : i32 to i64 loc(#loc3)
    %w = arith.muli %pid, %c4_i32 : i32 loc(#loc4)
    %q = arith.muli %r_0, %c2_i64 : i64 loc(#loc5)
    %p = tt.splat %x_ptr : !tt.ptr<bf16> -> tensor<8x!tt.ptr<bf16>> loc(#loc6)
    %a = tt.addptr %x_ptr, %q : !tt.ptr<bf16>, i64 loc(#loc7)
    """
    assert narrow_products_in_addresses(ttir) == ["%r = arith.muli %pid, %c8_i32 : i32 loc(#loc2)"]
    assert narrow_products_in_addresses(ttir.replace("%r_0, %c2_i64", "%pid, %c2_i64")) == []
