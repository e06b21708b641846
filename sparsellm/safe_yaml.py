"""YAML from users, parsed with bounded time and memory.

`yaml.safe_load` constructs only plain data, but anchors and aliases let a few hundred bytes describe
a structure with billions of values ("billion laughs": each level a list of aliases of the level
before). safe_load itself shares the aliased objects, so the load is cheap; everything that walks the
result afterwards (validation, dumping, hashing the recipe) visits every value of the expanded tree.
`load` counts that expanded size on the composed node graph first (linear in the distinct nodes) and
refuses a document above MAX_NODES. Deep nesting is refused too: PyYAML's scanner takes time quadratic
in the depth of flow collections ("[[[[...": 5,000 levels, 10 kB, take a minute), and its composer
recurses once per level. All of these raise yaml.YAMLError, like any other bad YAML."""
from __future__ import annotations

import yaml

MAX_NODES = 100_000  # a recipe has a few hundred values; this leaves room for long target/ignore lists
MAX_CHARS = 1_000_000  # a recipe is a few kB; the pure-Python parser takes seconds per MB
MAX_DEPTH = 64  # flow collections ([...], {...}) inside each other; a recipe has 3 or 4


class YAMLRefused(yaml.YAMLError):
    """A document refused before or instead of parsing; `problem` is one line, as for a parser error."""

    def __init__(self, problem: str):
        super().__init__(problem)
        self.problem, self.problem_mark = problem, None


def expanded_size(node: yaml.Node, limit: int = MAX_NODES) -> int:
    """Number of values `node` stands for once every alias is written out (stops counting above `limit`)."""
    sizes: dict[int, int] = {}
    stack = [(node, False)]
    while stack:
        n, children_done = stack.pop()
        if id(n) in sizes:
            continue
        kids = [] if isinstance(n, yaml.ScalarNode) else \
            [x for pair in n.value for x in pair] if isinstance(n, yaml.MappingNode) else list(n.value)
        if children_done:
            sizes[id(n)] = min(limit + 1, 1 + sum(sizes[id(k)] for k in kids))
        else:
            stack.append((n, True))
            stack.extend((k, False) for k in kids if id(k) not in sizes)
    return sizes[id(node)]


def flow_depth(text: str) -> int:
    """Deepest nesting of [ ] and { } outside quoted strings and comments, in one linear pass (an upper
    bound of what the YAML scanner will see: brackets inside block scalars count too)."""
    depth = deepest = 0
    quote, prev = None, "\n"
    it = iter(text)
    for ch in it:
        if quote:
            if ch == quote:
                quote = None
            elif ch == "\\" and quote == '"':
                next(it, None)
        elif ch in "\"'" and (prev in " \t\n[{,:" or depth):
            quote = ch
        elif ch == "#" and prev in " \t\n":
            for ch in it:
                if ch == "\n":
                    break
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth = max(0, depth - 1)
        prev = ch
    return deepest


def load(text: str, max_nodes: int = MAX_NODES, max_depth: int = MAX_DEPTH):
    """yaml.safe_load(text), refusing documents that expand to more than `max_nodes` values or nest
    flow collections deeper than `max_depth`."""
    if len(text) > MAX_CHARS:
        raise YAMLRefused(f"it has {len(text):,} characters, more than the {MAX_CHARS:,} a recipe may have")
    if flow_depth(text) > max_depth:
        raise YAMLRefused(f"it nests brackets more than {max_depth} levels deep")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None and expanded_size(node, max_nodes) > max_nodes:
            raise YAMLRefused(f"its anchors and aliases expand to more than {max_nodes:,} values")
        return yaml.safe_load(text)
    except RecursionError:
        raise YAMLRefused("it is nested too deeply") from None
    except yaml.reader.ReaderError as e:  # its message spans two lines and has no `problem`
        raise YAMLRefused(f"character {e.character!r} at position {e.position} is not allowed in YAML") from None
