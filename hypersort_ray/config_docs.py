"""Render the configuration reference (docs/configuration.md) from the pydantic models.

    python -m hypersort_ray.config_docs > docs/configuration.md
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel

from hypersort_ray.config import ExperimentConfig, ServeSettings, SweepConfig


def _rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += _rows(ann, key + ".")
            continue
        default: Any = field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            default = default.model_dump(mode="json")
        type_name = _type_name(ann, field.metadata)
        rows.append((key, type_name, repr(default).replace("|", "\\|"), (field.description or "").replace("|", "\\|")))
    return rows


def _type_name(ann: Any, metadata: list[Any]) -> str:
    text = str(ann).replace("typing.", "").replace("pathlib.", "")
    text = re.sub(r"<class '(\w+)'>", r"\1", text)
    text = re.sub(r"Annotated\[(\w+), FieldInfo\([^\]]*metadata=\[([^\]]*)\]\)\]", r"\1 (\2)", text)
    text = text.replace(" | ", " or ")  # a pipe would split the markdown table cell
    bounds = ", ".join(str(m) for m in metadata)
    return f"{text} ({bounds})" if bounds else text


def render() -> str:
    parts = [
        "# Configuration reference",
        "",
        "Generated from the pydantic models in `hypersort_ray/config.py` "
        "(`python -m hypersort_ray.config_docs > docs/configuration.md`). Unknown and repeated keys are errors; "
        "override any key with `--set key.path=value`.",
    ]
    for title, model in (("Experiment (`hypersort train`, configs/demo.yaml)", ExperimentConfig),
                         ("Sweep (`hypersort sweep`, configs/sweep.yaml; `base.` is an experiment)", SweepConfig),
                         ("Serve (`hypersort serve --config`, configs/serve.yaml)", ServeSettings)):
        parts += ["", f"## {title}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for key, typ, default, desc in _rows(model):
            if model is SweepConfig and key.startswith("base."):
                continue
            parts.append(f"| `{key}` | `{typ}` | `{default}` | {desc} |")
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    print(render(), end="")
