"""Build the embedded demo dataset ``finetune/demo_data`` from Debian's ``tuxpaint-stamps-default``.

The stamps are photo cut-outs with an alpha channel, sorted in category folders. Each one is
composited on a plain light background (cycled per class, so the background is no class cue),
padded to a square and resized to 256x256, then saved as JPEG. The output is deterministic.

    apt-get install tuxpaint-stamps-default
    python scripts/build_demo_data.py            # writes finetune/demo_data/<class>/*.jpg and NOTICE.md
"""

from __future__ import annotations

import argparse
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

logger = logging.getLogger("build_demo_data")

REPO = Path(__file__).resolve().parents[1]
STAMPS = Path("/usr/share/tuxpaint/stamps")
COPYRIGHT = Path("/usr/share/doc/tuxpaint-stamps-default/copyright")
# class name -> (stamp folder, include subfolders)
CLASSES: dict[str, tuple[str, bool]] = {
    "birds": ("animals/birds", False),
    "flowers": ("plants/flowers", False),
    "fruit": ("food/fruit", False),
    "mammals": ("animals/mammals", True),
    "vegetables": ("food/vegetables", False),
}
# Not photos of the real thing: drawings, toys, plastic imitations.
SKIP_FOLDERS = frozenset({"cartoon", "toys", "plastic"})
SKIP_STEMS = frozenset({"echidna", "hedgehog"})  # a black silhouette and a cartoon among the photos
BACKGROUNDS = ((244, 244, 242), (236, 231, 220), (224, 231, 238), (229, 238, 228))
SIZE = 256
MARGIN = 0.08  # fraction of the longer side left free around the cut-out
QUALITY = 88


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stamps", type=Path, default=STAMPS, help="tuxpaint stamps folder")
    parser.add_argument("--out", type=Path, default=REPO / "finetune" / "demo_data", help="output folder")
    return parser


def stamp_files(folder: Path, recursive: bool) -> Iterator[Path]:
    """PNG stamps of one category, sorted, without cartoons, toys and known clip-art."""
    files = folder.rglob("*.png") if recursive else folder.glob("*.png")
    for path in sorted(files):
        parts = set(path.relative_to(folder).parts[:-1])
        if parts & SKIP_FOLDERS or path.stem in SKIP_STEMS:
            continue
        yield path


def compose(path: Path, background: tuple[int, int, int]) -> Image.Image:
    """Cut-out on a plain background, centred on a square canvas, SIZE x SIZE."""
    with Image.open(path) as src:
        rgba = src.convert("RGBA")
    bbox = rgba.getchannel("A").getbbox()
    if bbox:
        rgba = rgba.crop(bbox)
    side = round(max(rgba.size) * (1 + 2 * MARGIN))
    canvas = Image.new("RGBA", (side, side), (*background, 255))
    offset = ((side - rgba.width) // 2, (side - rgba.height) // 2)
    canvas.alpha_composite(rgba, offset)
    return canvas.convert("RGB").resize((SIZE, SIZE), Image.Resampling.LANCZOS)


def build_class(name: str, folder: Path, recursive: bool, out: Path) -> int:
    """Write ``out/<name>/*.jpg``; returns the number of images."""
    target = out / name
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    count = 0
    for index, path in enumerate(stamp_files(folder, recursive)):
        stem = "_".join(path.relative_to(folder).with_suffix("").parts).lower()
        image = compose(path, BACKGROUNDS[index % len(BACKGROUNDS)])
        image.save(target / f"{stem}.jpg", format="JPEG", quality=QUALITY, optimize=False)
        count += 1
    return count


def upstream_copyright() -> str:
    """The upstream ``Files: *`` stanza of the Debian copyright file, as written there."""
    lines = COPYRIGHT.read_text(encoding="utf-8").splitlines()
    start = lines.index("Files: *")
    end = next(i for i in range(start, len(lines)) if not lines[i].strip())
    return "\n".join(lines[start:end])


def notice(counts: dict[str, int], out: Path) -> str:
    table = "\n".join(f"| {name} | `{CLASSES[name][0]}` | {n} |" for name, n in counts.items())
    return f"""# Demo data: notice

Real photo cut-outs from the Debian package **tuxpaint-stamps-default** (upstream: Tux Paint
stamps, <http://sourceforge.net/projects/tuxpaint>), licensed under the **GNU General Public
License, version 2 or later** (GPL-2). These images are therefore GPL-2, unlike the rest of this
repository; the full licence text is in `/usr/share/common-licenses/GPL-2` on Debian systems and at
<https://www.gnu.org/licenses/old-licenses/gpl-2.0.html>.

Upstream copyright, as given in `{COPYRIGHT}`:

```
{upstream_copyright()}
```

## Classes

| class | stamp folder | images |
|---|---|---|
{table}

Left out: everything under `cartoon/`, `toys/` and `plastic/` folders, and two non-photo stamps
(`{"`, `".join(sorted(SKIP_STEMS))}`). `mammals` takes its subfolders (bovines, rodents, ...); the others the
top level only.

## What was done to the images

Each stamp's alpha channel was trimmed to its bounding box, composited on a plain light
background (one of {len(BACKGROUNDS)} colours, cycled in file order within each class so the
background is no class cue), centred on a square canvas with a {MARGIN:.0%} margin, resized to
{SIZE}x{SIZE} (Lanczos) and saved as JPEG quality {QUALITY}. Small stamps are upscaled and look soft.

## Regenerate

```
apt-get install tuxpaint-stamps-default
python scripts/build_demo_data.py --out {out.relative_to(REPO) if out.is_relative_to(REPO) else out}
```
"""


def main(args: argparse.Namespace) -> None:
    out: Path = args.out.resolve()
    counts = {}
    for name, (folder, recursive) in CLASSES.items():
        counts[name] = build_class(name, args.stamps / folder, recursive, out)
        logger.info("%s: %d images", name, counts[name])
    (out / "NOTICE.md").write_text(notice(counts, out), encoding="utf-8")
    total = sum(p.stat().st_size for p in out.rglob("*.jpg"))
    logger.info("%d images, %.2f MB in %s", sum(counts.values()), total / 1e6, out)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(get_args_parser().parse_args())
