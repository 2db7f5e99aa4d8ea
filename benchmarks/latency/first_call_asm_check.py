"""Check that skipping ``codegen.SKIPPED_TIR_PASSES`` leaves every function's machine code as it
was, and time the TIR pipeline + LLVM with and without them.

Lowers one torchvision model like ``first_call.py`` (x86, fused and scheduled as ``build`` does,
after the Relax pipeline and VM code generation), then compiles each PrimFunc on its own
(``tvm.tirx.build``, argument checks off) twice -- TVM's default TIR pipeline and the one without
the skipped passes -- alternating, and compares the instruction lines of the two assemblies.

Usage:
  python benchmarks/latency/first_call_asm_check.py --model inception_v3:96
"""

from __future__ import annotations

import argparse
import json
import os
import time

from first_call import converted_model  # the script's folder is on sys.path


def _instructions(asm: str) -> list[str]:
    return [line for line in asm.splitlines()
            if line.startswith("\t") and not line.startswith("\t.")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="inception_v3:96")
    args = ap.parse_args()
    name, _, size = args.model.partition(":")
    converted, x = converted_model(name, int(size))
    from djpq_compiler.backends.tvm import adapter, codegen
    from djpq_compiler.backends.tvm.build import target_spec
    from djpq_compiler.backends.tvm.emit import lower

    tvm = adapter.load_tvm()
    from tvm.relax import vm_build

    spec, _ = target_spec("x86")
    target = adapter.make_target(spec)
    mod, _ = lower(converted, [x], spec)
    mod = adapter.schedule_elementwise(adapter.fuse_module(mod, target), target)
    with target:
        lowered = tvm.relax.get_pipeline("default")(mod)
    leftover = vm_build._vmcodegen(tvm.relax.ExecBuilder(), lowered, "bytecode")
    funcs = {g: f for g, f in leftover.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    seconds = {"default": 0.0, "skipped": 0.0}
    different = []
    for gvar, func in funcs.items():
        asm = {}
        for label, disabled in (("default", []), ("skipped", list(codegen.SKIPPED_TIR_PASSES))):
            with tvm.transform.PassContext(opt_level=3, config={"tirx.disable_assert": True},
                                           disabled_pass=disabled):
                part = tvm.IRModule({gvar: func}, attrs=leftover.attrs)
                start = time.process_time()
                lib = tvm.tirx.build(part, target=target)
                seconds[label] += time.process_time() - start
            asm[label] = _instructions(lib.inspect_source("asm"))
        if asm["default"] != asm["skipped"]:
            different.append(gvar.name_hint)
    print(json.dumps({"model": args.model, "functions": len(funcs),
                      "identical_machine_code": len(funcs) - len(different),
                      "different": different,
                      "tir_plus_llvm_cpu_s": {k: round(v, 2) for k, v in seconds.items()},
                      "skipped_passes": list(codegen.SKIPPED_TIR_PASSES),
                      "loadavg": os.getloadavg()}, indent=1))
    return 0 if not different else 1


if __name__ == "__main__":
    raise SystemExit(main())
