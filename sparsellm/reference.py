"""The recipe reference of docs/recipes.md, generated from the recipe schema: one table per section
(top level, calibration, evaluation, export) and per method of every stage kind, each row a field with
its type, default and description as the pydantic models declare them.

Regenerate the part of docs/recipes.md between the markers with
`python -m sparsellm.reference --write docs/recipes.md` (tests/test_docs.py fails when it is stale)."""
from __future__ import annotations

import sys
import types
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel
from pydantic.fields import PydanticUndefined

BEGIN = "<!-- generated: python -m sparsellm.reference --write docs/recipes.md (tests/test_docs.py keeps it current) -->\n"
END = "<!-- end of generated reference -->\n"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def type_name(annotation) -> str:
    """A field's type in words: `float`, `int or null`, `list of str`, one of the literal values."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        names = [f"`{a}`" for a in args]
        return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
    if origin in (typing.Union, types.UnionType):
        rest = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(rest + (["null"] if type(None) in args else []))
    if origin is list:
        return f"list of {type_name(args[0])}"
    if origin is tuple:
        return "[" + ", ".join(type_name(a) for a in args) + "]"
    if typing.get_origin(annotation) is typing.Annotated:
        return type_name(args[0])
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


def _number(v) -> str:
    return f"{v:g}"


def bounds(metadata) -> str:
    """A field's bounds (pydantic's ge/gt/le/lt constraints) as an interval: `in [0, 1)`, `> 0`, `≥ 0`."""
    lo = hi = None
    for m in metadata:
        if getattr(m, "ge", None) is not None:
            lo = f"[{_number(m.ge)}"
        elif getattr(m, "gt", None) is not None:
            lo = f"({_number(m.gt)}"
        elif getattr(m, "le", None) is not None:
            hi = f"{_number(m.le)}]"
        elif getattr(m, "lt", None) is not None:
            hi = f"{_number(m.lt)})"
    if lo and hi:
        return f"in {lo}, {hi}"
    if lo:
        return ("≥ " if lo[0] == "[" else "> ") + lo[1:]
    if hi:
        return ("≤ " if hi[-1] == "]" else "< ") + hi[:-1]
    return ""


def default_text(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        return "see below" if isinstance(value, BaseModel) else f"`{_yaml(value)}`"
    if field.default is PydanticUndefined:
        return "required"
    return f"`{_yaml(field.default)}`"


def _yaml(value) -> str:
    value = list(value) if isinstance(value, tuple) else value
    return yaml.safe_dump(value, default_flow_style=True, allow_unicode=True).removesuffix("\n...\n").strip()


def field_table(model: type[BaseModel], skip: tuple[str, ...] = ("method",)) -> list[str]:
    rows = ["| field | type | default | description |", "|---|---|---|---|"]
    for name, f in model.model_fields.items():
        if name in skip:
            continue
        kind = type_name(f.annotation)
        if limit := bounds(f.metadata):
            kind += f", {limit}"
        rows.append(f"| `{f.alias or name}` | {_cell(kind)} | {_cell(default_text(f))} | {_cell(f.description or '')} |")
    return rows


def _doc(model) -> list[str]:
    doc = " ".join((model.__doc__ or "").split("\n\n")[0].split())
    return [doc, ""] if doc else []


def reference_markdown() -> str:
    """The generated reference: Markdown between BEGIN and END in docs/recipes.md."""
    from . import stage
    from .recipe import Calibration, Evaluation, Speed, recipe_model

    recipe = recipe_model()
    export = recipe.model_fields["export"].annotation
    out = ["### Top level", "", *field_table(recipe, skip=()), ""]
    for title, model in (("calibration", Calibration), ("evaluation", Evaluation), ("evaluation.speed", Speed),
                         ("export", export)):
        out += [f"### {title}", "", *_doc(model), *field_table(model), ""]
    out += ["### stages", "",
            "Each entry of `stages` has exactly one key, its kind, whose value names the method "
            "(`method:`) and sets that method's fields, e.g. `- prune: {method: wanda, sparsity: 0.5}`.", ""]
    for kind in stage.KINDS:
        out += [f"#### {kind}", "", f"`{kind}`: {stage.KIND_HELP[kind]}. Methods: "
                + ", ".join(f"`{m}`" for m in stage.methods(kind)) + ".", ""]
        for name in stage.methods(kind):
            spec = stage.spec_class(kind, name)
            out += [f"##### {kind}: {name}", "", *_doc(spec), *field_table(spec), ""]
    return "\n".join(out).rstrip("\n") + "\n"


def generated_part(text: str) -> str:
    """The part of a page between the markers (ValueError when they are missing)."""
    if BEGIN not in text or END not in text:
        raise ValueError("the page has no generated reference markers")
    return text.split(BEGIN, 1)[1].split(END, 1)[0]


def rewrite(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    old = generated_part(text)
    page.write_text(text.replace(BEGIN + old + END, BEGIN + reference_markdown() + END), encoding="utf-8")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write"] and len(sys.argv) == 3:
        rewrite(Path(sys.argv[2]))
    else:
        print(reference_markdown(), end="")
