"""Draw difflab's layers and its package-level import graph: docs/images/architecture.png.

    .venv/bin/python tools/architecture.py [--out PATH]

The graph is the real one: grimp (the graph library under import-linter) builds the module-level
import graph of `difflab`, and every module is folded into its subpackage (`difflab.sampling.grids`
-> `sampling`). The layers come from the "layers" contract in pyproject.toml and the forbidden
edges from its "forbidden" contracts, so the picture shows what `lint-imports` enforces.

Prints the package-level edge list (`importer -> imported  (module-level imports)`), then the
package root's imports (`difflab/__init__.py`, the public API, is no subpackage and is not drawn),
and writes the PNG: one horizontal band per layer, core at the bottom; one box per subpackage with
what it holds; one arrow per package-level import, coloured by the importer. An edge that breaks a
rule (upward, between independent packages of one layer, or named by a forbidden contract) is
flagged in the list and drawn in red; the script then exits with status 1.
"""
from __future__ import annotations

import argparse
import collections
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import grimp
import matplotlib

try:
    import tomllib
except ModuleNotFoundError:   # Python 3.10
    import tomli as tomllib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "difflab"
OUT = ROOT / "docs" / "images" / "architecture.png"

# band titles, keyed by the first package of a layer (the contract gives the layers; this names them)
LAYER_TITLES = {
    "apps": "apps\nusers of the library",
    "interop": "interop\nforeign formats",
    "amed": "method packages\n(independent)",
    "sampling": "shared toolboxes\n(independent)",
    "models": "models, data\n(independent)",
    "nets": "nets\nnetworks only",
    "core": "core\nthe contract",
}
COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
           "#7f7f7f", "#393b79", "#637939", "#843c39"]
WIDTH, LEFT, BAND_HEIGHT, CAPTION = 16.0, 2.5, 1.55, 0.45     # figure units
# a lone package's box: (centre, width) as fractions of the drawing area, for readability only: the apps
# box wide (its arrows fan out), interop to the left (beside amed and sampling, which it imports), so the
# apps' arrows to the lower layers pass beside it; the bottom box wide, since every layer imports it
LONE_BOX = {"apps": (0.5, 0.7), "interop": (0.2, 0.3)}


@dataclass
class Box:
    name: str           # subpackage: "core", "sampling", ...
    layer: int          # band index, 0 = bottom
    x: float            # centre
    y: float            # centre
    width: float
    height: float


Contracts = list[tuple[list[str], list[str]]]     # forbidden contracts: (sources, forbidden), short names


# ----- the graph ---------------------------------------------------------------------------------
def package_of(module: str) -> str | None:
    """The subpackage a module belongs to: 'difflab.sampling.grids' -> 'sampling'; None for the root."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def package_graph(graph) -> tuple[collections.Counter, collections.Counter]:
    """(Counter of (importer, imported) subpackage pairs, Counter of the root's imports by subpackage),
    each counting module-level imports. An import of the root from a subpackage is (package, None)."""
    edges: collections.Counter = collections.Counter()
    root_edges: collections.Counter = collections.Counter()
    for module in sorted(graph.modules):
        package = package_of(module)
        for imported in graph.find_modules_directly_imported_by(module):
            target = package_of(imported)
            if package is None and target is not None:
                root_edges[target] += 1
            elif target != package:
                edges[(package, target)] += 1
    return edges, root_edges


def contents(package: str, graph) -> str:
    """What a package holds: its modules, each subpackage as 'name/{a, b}' or 'name/ (n modules)'."""
    prefix = f"{PACKAGE}.{package}."
    children = sorted(m[len(prefix):] for m in graph.modules if m.startswith(prefix))
    parts = []
    for child in (c for c in children if "." not in c):
        inner = [c[len(child) + 1:] for c in children if c.startswith(child + ".")]
        if not inner:
            parts.append(child)
        elif len(inner) <= 3:
            parts.append(f"{child}/{{{', '.join(inner)}}}")
        else:
            parts.append(f"{child}/ ({len(inner)} modules)")
    return ", ".join(parts)


# ----- the contracts -----------------------------------------------------------------------------
def read_contracts(pyproject: Path) -> tuple[list[list[str]], Contracts]:
    """(layers bottom first, e.g. [['core'], ['nets'], ['models', 'data'], …], forbidden contracts)."""
    contracts = tomllib.loads(pyproject.read_text())["tool"]["importlinter"]["contracts"]
    short = lambda name: name.strip().removeprefix(f"{PACKAGE}.")  # noqa: E731
    layers = next(c["layers"] for c in contracts if c["type"] == "layers")
    forbidden = [([short(n) for n in c["source_modules"]], [short(n) for n in c["forbidden_modules"]])
                 for c in contracts if c["type"] == "forbidden"]
    return [[short(name) for name in layer.split("|")] for layer in reversed(layers)], forbidden


def within(name: str, packages: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def breaks_rule(source: Box, target: Box | None, forbidden: Contracts, top_layer: int) -> bool:
    """Upward, sideways (packages of one layer are independent), forbidden by name, or into the root
    from below the top layer (the root imports the method packages: that would be a cycle).

    Forbidden contracts are checked at package level: one whose source and target lie in the same
    subpackage (apps.demo must not import apps.cli) is inside one box and shows no arrow."""
    if target is None:
        return source.layer != top_layer
    if any(within(source.name, s) and within(target.name, f) for s, f in forbidden):
        return True
    return target.layer >= source.layer


# ----- the picture -------------------------------------------------------------------------------
def layout(bands: list[list[str]], right: float) -> dict[str, Box]:
    """One box per package, evenly spread across its band; a lone package gets a box of moderate width
    (so arrows that skip its layer pass beside it), except the bottom one, which every layer imports."""
    boxes = {}
    for level, band in enumerate(bands):
        area = right - LEFT
        slot = area / len(band)
        if len(band) > 1:
            places = [(slot * (i + 0.5), min(slot * 0.8, 4.0)) for i in range(len(band))]
        else:
            centre, fraction = LONE_BOX.get(band[0], (0.5, 0.85 if level == 0 else 0.36))
            places = [(area * centre, area * fraction)]
        for name, (x, width) in zip(band, places):
            boxes[name] = Box(name, level, LEFT + x, CAPTION + (level + 0.5) * BAND_HEIGHT, width, BAND_HEIGHT * 0.5)
    return boxes


def anchors(boxes: dict[str, Box], edges: list[tuple[str, str]]) -> dict[tuple[str, str], tuple]:
    """Start and end point of each arrow, spread along the bottom edge of the importer and the top edge
    of the imported (ordered by the other end's x), so the arrows of one box do not meet at one point."""
    leaving, entering = collections.defaultdict(list), collections.defaultdict(list)
    for source, target in edges:
        leaving[source].append((boxes[target].x, target))
        entering[target].append((boxes[source].x, source))
    points = {}
    for source, target in edges:
        s, t = boxes[source], boxes[target]
        if s.layer == t.layer:                                   # sideways: side to side
            sign = 1 if t.x > s.x else -1
            points[(source, target)] = ((s.x + sign * s.width / 2, s.y), (t.x - sign * t.width / 2, t.y))
            continue
        out, inn = sorted(leaving[source]), sorted(entering[target])
        k_out = [name for _, name in out].index(target)
        k_in = [name for _, name in inn].index(source)
        x0 = s.x - s.width * 0.45 + s.width * 0.9 * (k_out + 0.5) / len(out)
        x1 = t.x - t.width * 0.45 + t.width * 0.9 * (k_in + 0.5) / len(inn)
        down = 1 if t.layer < s.layer else -1
        points[(source, target)] = ((x0, s.y - down * s.height / 2), (x1, t.y + down * t.height / 2))
    return points


def draw_bands(ax, bands: list[list[str]]) -> None:
    for level, band in enumerate(bands):
        y = CAPTION + level * BAND_HEIGHT
        ax.add_patch(Rectangle((0, y), WIDTH, BAND_HEIGHT, zorder=0, edgecolor="none",
                               facecolor="#f3f3f3" if level % 2 else "#e4edf7"))
        title = LAYER_TITLES.get(band[0], " | ".join(band))
        ax.text(0.15, y + BAND_HEIGHT / 2, title, va="center", ha="left", fontsize=11, fontweight="bold",
                color="#333333", linespacing=1.35)


def draw_arrows(ax, boxes: dict[str, Box], edges: collections.Counter, colour: dict[str, str],
                forbidden: Contracts) -> None:
    drawable = [(s, t) for s, t in edges if t is not None]
    top_layer = max(box.layer for box in boxes.values())
    points = anchors(boxes, drawable)
    for source, target in sorted(drawable):
        s, t = boxes[source], boxes[target]
        broken = breaks_rule(s, t, forbidden, top_layer)
        near = abs(s.layer - t.layer) <= 1
        rad = 0.0 if near else 0.06 * (1 if t.x >= s.x else -1)
        ax.add_patch(FancyArrowPatch(
            *points[(source, target)], arrowstyle="-|>", mutation_scale=12, connectionstyle=f"arc3,rad={rad}",
            color="red" if broken else colour[source], linewidth=2.8 if broken else (1.4 if near else 1.1),
            alpha=1.0 if broken else (0.9 if near else 0.6), zorder=5 if broken else (2 if near else 1),
            shrinkA=0, shrinkB=1))


def draw_boxes(ax, boxes: dict[str, Box], listing: dict[str, str], colour: dict[str, str]) -> None:
    for box in boxes.values():
        ax.add_patch(FancyBboxPatch((box.x - box.width / 2, box.y - box.height / 2), box.width, box.height,
                                    boxstyle="round,pad=0.02,rounding_size=0.12", zorder=3, facecolor="white",
                                    edgecolor=colour.get(box.name, "#555555"), linewidth=2.0))
        ax.text(box.x, box.y + box.height * 0.2, box.name, ha="center", va="center", fontsize=13,
                fontweight="bold", zorder=4)
        text = textwrap.fill(listing[box.name] or "(no modules)", width=max(int(box.width * 11), 20))
        ax.text(box.x, box.y - box.height * 0.2, text, ha="center", va="center", fontsize=8, color="#444444",
                zorder=4, linespacing=1.1)


def draw(bands, boxes, listing, edges, forbidden: Contracts, out: Path) -> None:
    height = CAPTION + len(bands) * BAND_HEIGHT
    fig, ax = plt.subplots(figsize=(WIDTH * 0.85, height * 0.85))
    ax.set_xlim(0, WIDTH)
    ax.set_ylim(0, height)
    ax.axis("off")
    sources = sorted({s for s, _ in edges})
    colour = {s: COLOURS[i % len(COLOURS)] for i, s in enumerate(sources)}
    draw_bands(ax, bands)
    draw_arrows(ax, boxes, edges, colour, forbidden)
    draw_boxes(ax, boxes, listing, colour)
    ax.text(WIDTH - 0.1, CAPTION / 2, "arrow: importer → imported, in the importer's colour (red: a broken rule).  "
            "Drawn by tools/architecture.py from the import graph (grimp) and the contracts in pyproject.toml.",
            ha="right", va="center", fontsize=8.5, color="#555555")
    fig.tight_layout(pad=0.1)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


# ----- main --------------------------------------------------------------------------------------
def assign_bands(packages: list[str], layers: list[list[str]]) -> list[list[str]]:
    """The packages of each layer, bottom first, in the contract's order; SystemExit naming any package
    that no layer holds (the contract would not check it)."""
    bands = [[p for p in layer if p in packages] for layer in layers]
    missing = sorted(set(packages) - {p for band in bands for p in band})
    if missing:
        raise SystemExit(f"subpackages in no layer of pyproject.toml's contract: {missing}")
    return bands


def print_edges(edges, root_edges, boxes, forbidden: Contracts) -> int:
    """Print the edge list, top layer first; returns the number of edges that break a rule."""
    broken, top_layer = 0, max(box.layer for box in boxes.values())
    for (source, target), count in sorted(edges.items(), key=lambda e: (-boxes[e[0][0]].layer, e[0][0], str(e[0][1]))):
        bad = breaks_rule(boxes[source], boxes.get(target), forbidden, top_layer)
        broken += bad
        flag = "   <-- breaks a rule" if bad else ""
        print(f"{source:>10} -> {target or PACKAGE + ' (the root)':<10} ({count}){flag}")
    print(f"package root {PACKAGE}/__init__.py (the public API, not drawn) -> "
          + ", ".join(f"{p} ({n})" for p, n in sorted(root_edges.items())))
    return broken


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"the PNG to write (default {OUT.relative_to(ROOT)})")
    args = parser.parse_args()

    graph = grimp.build_graph(PACKAGE, cache_dir=None)
    edges, root_edges = package_graph(graph)
    packages = sorted({p for p in map(package_of, graph.modules) if p is not None})
    layers, forbidden = read_contracts(ROOT / "pyproject.toml")
    bands = assign_bands(packages, layers)
    boxes = layout(bands, WIDTH - 0.2)
    broken = print_edges(edges, root_edges, boxes, forbidden)
    draw(bands, boxes, {p: contents(p, graph) for p in packages}, edges, forbidden, args.out)
    print(f"wrote {args.out}")
    if broken:
        sys.exit(f"{broken} package-level import(s) break a layer rule (drawn in red)")


if __name__ == "__main__":
    main()
