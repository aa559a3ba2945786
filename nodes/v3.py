"""V3 node classes (comfy_api.latest io.ComfyNode schemas) built from definitions.NODE_DEFS.

Importing this module raises ImportError when ComfyUI has no V3 API; nodes/__init__.py then uses v1.py.
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io, ui

from .definitions import ANY_TYPE, CATEGORY, NODE_DEFS, STACK_TYPE, In, NodeDef, Out, always_changed

LoRAStackType = io.Custom(STACK_TYPE)

_SIMPLE_INPUTS = {"MODEL": io.Model, "CLIP": io.Clip, STACK_TYPE: LoRAStackType, ANY_TYPE: io.AnyType}
_OUTPUTS = {
    "MODEL": io.Model,
    "CLIP": io.Clip,
    "STRING": io.String,
    "IMAGE": io.Image,
    STACK_TYPE: LoRAStackType,
    ANY_TYPE: io.AnyType,
}


def _input(i: In):
    common = {"tooltip": i.tooltip, "optional": i.optional}
    if i.type in _SIMPLE_INPUTS:
        return _SIMPLE_INPUTS[i.type].Input(i.name, **common)
    if i.type == "COMBO":
        return io.Combo.Input(i.name, options=i.options() if i.options else [], default=i.default, **common)
    if i.type == "FLOAT":
        return io.Float.Input(i.name, default=i.default, min=i.min, max=i.max, step=i.step, **common)
    if i.type == "INT":
        return io.Int.Input(i.name, default=i.default, min=i.min, max=i.max, step=i.step, **common)
    if i.type == "BOOLEAN":
        return io.Boolean.Input(i.name, default=i.default, **common)
    if i.type == "STRING":
        return io.String.Input(i.name, default=i.default, multiline=i.multiline, **common)
    raise TypeError(f"no V3 input for type {i.type!r}")


def _output(o: Out):
    # V3 ids must differ between inputs and outputs; the display name is what the UI shows.
    return _OUTPUTS[o.type].Output(f"{o.name}_out", display_name=o.name, tooltip=o.tooltip)


def make_v3_node(defn: NodeDef) -> type[io.ComfyNode]:
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=defn.node_id,
            display_name=defn.display_name,
            category=CATEGORY,
            description=defn.description,
            inputs=[_input(i) for i in defn.inputs],
            outputs=[_output(o) for o in defn.outputs],
            is_output_node=defn.output_node,
        )

    def execute(cls, **kwargs) -> io.NodeOutput:
        result = defn.run(**kwargs)
        return io.NodeOutput(*result.values, ui=ui.PreviewText(result.text) if result.text is not None else None)

    attrs = {
        "__doc__": defn.description,
        "__module__": __name__,
        "define_schema": classmethod(define_schema),
        "execute": classmethod(execute),
    }
    if defn.always_run:
        attrs["fingerprint_inputs"] = classmethod(lambda cls, **kw: always_changed(**kw))
    return type(defn.node_id, (io.ComfyNode,), attrs)


V3_NODES: list[type[io.ComfyNode]] = [make_v3_node(d) for d in NODE_DEFS]


class FluxLoRAOpsExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(V3_NODES)


async def comfy_entrypoint() -> FluxLoRAOpsExtension:
    return FluxLoRAOpsExtension()
