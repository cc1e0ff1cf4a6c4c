"""Declare non-standard ONNX ops (com.microsoft contrib ops, plugin nodes) to onnx so onnxscript can emit them."""
from __future__ import annotations

FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


def register_schema(domain: str, name: str, inputs: list[tuple[str, str, bool]], attributes: list[tuple[str, str]],
                    outputs: tuple[str, ...] = ("output",), types: dict[str, list[str]] | None = None) -> None:
    """inputs: (name, type variable, optional); attributes: (name, AttrType name); idempotent."""
    from onnx import defs
    if defs.has(name, domain):
        return
    optional = defs.OpSchema.FormalParameterOption.Optional
    single = defs.OpSchema.FormalParameterOption.Single
    params = [defs.OpSchema.FormalParameter(n, t, "", param_option=optional if opt else single)
              for n, t, opt in inputs]
    attrs = [defs.OpSchema.Attribute(n, getattr(defs.OpSchema.AttrType, t), "", required=False)
             for n, t in attributes]
    types = types or {"T": FLOATS, "R": ["tensor(float)"]}
    defs.register_schema(defs.OpSchema(
        name, domain, 1, "", inputs=params, outputs=[defs.OpSchema.FormalParameter(o, "T", "") for o in outputs],
        type_constraints=[(var, allowed, "") for var, allowed in types.items()], attributes=attrs))
