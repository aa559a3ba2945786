"""V1 node classes (INPUT_TYPES / RETURN_TYPES / FUNCTION) built from definitions.NODE_DEFS.

Used when ComfyUI has no `comfy_api.latest` (older versions) or when FLUX_LORA_OPS_FORCE_V1=1.
"""

from __future__ import annotations

from .definitions import ANY_TYPE, CATEGORY, NODE_DEFS, In, NodeDef, always_changed

try:
    from comfy.comfy_types import IO

    _ANY = IO.ANY  # a str whose != matches every type, as core's PreviewAny uses
except ImportError:  # pragma: no cover - very old ComfyUI
    _ANY = ANY_TYPE


def _type(t: str):
    return _ANY if t == ANY_TYPE else t


def _input_spec(i: In) -> tuple:
    opts: dict = {"tooltip": i.tooltip}
    if i.type == "COMBO":
        choices = i.options() if i.options else []
        if i.default is not None:
            opts["default"] = i.default
        return (choices, opts)
    for key in ("default", "min", "max", "step"):
        value = getattr(i, key)
        if value is not None:
            opts[key] = value
    if i.type == "STRING" and i.multiline:
        opts["multiline"] = True
    return (_type(i.type), opts)


def make_v1_node(defn: NodeDef) -> type:
    def INPUT_TYPES(cls):  # noqa: N802 - ComfyUI's name
        required = {i.name: _input_spec(i) for i in defn.inputs if not i.optional}
        optional = {i.name: _input_spec(i) for i in defn.inputs if i.optional}
        return {"required": required, "optional": optional}

    def run(self, **kwargs):
        result = defn.run(**kwargs)
        if result.text is None:
            return result.values
        return {"ui": {"text": [result.text]}, "result": result.values}

    attrs = {
        "__doc__": defn.description,
        "INPUT_TYPES": classmethod(INPUT_TYPES),
        "RETURN_TYPES": tuple(_type(o.type) for o in defn.outputs),
        "RETURN_NAMES": tuple(o.name for o in defn.outputs),
        "OUTPUT_TOOLTIPS": tuple(o.tooltip for o in defn.outputs),
        "FUNCTION": "run",
        "CATEGORY": CATEGORY,
        "DESCRIPTION": defn.description,
        "OUTPUT_NODE": defn.output_node,
        "run": run,
    }
    if defn.always_run:
        attrs["IS_CHANGED"] = classmethod(lambda cls, **kw: always_changed(**kw))
    return type(defn.node_id, (), attrs)


V1_NODES: dict[str, type] = {d.node_id: make_v1_node(d) for d in NODE_DEFS}
V1_DISPLAY_NAMES: dict[str, str] = {d.node_id: d.display_name for d in NODE_DEFS}
