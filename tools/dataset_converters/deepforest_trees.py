#!/usr/bin/env python
"""Tree crowns in NEON airborne RGB photos (the data shipped in the PyPI wheel
``deepforest==2.1.0``, folder ``deepforest/data/``) as 400x400 tiles in COCO format.

    python tools/dataset_converters/deepforest_trees.py [--out data/trees] [--wheel-dir DIR]

Source (hand-drawn crown boxes, Pascal-VOC xml; labels ``Tree`` / ``Alive`` / ``Dead`` all
become the one class ``tree``):

=============================================  ===========  =====
image                                          size (WxH)   boxes
=============================================  ===========  =====
2019_YELL_2_528000_4978000_image_crop2.png     2299x2472    574
2019_YELL_2_541000_4977000_image_crop.png      1249x1035    279
OSBS_029.png                                   400x400      61
SOAP_061.png                                   400x400      37
=============================================  ===========  =====

The wheel is fetched with ``pip download --no-deps deepforest==2.1.0`` (this interpreter's
pip) unless ``--wheel-dir`` holds it already; only ``deepforest/data/*.png|xml`` is read from
the zip, deepforest itself is never imported or installed.

Tiling (fixed, no randomness):

* non-overlapping 400x400 grid from the top-left corner; an edge tile is kept when the image
  covers at least half of it in each direction (remainder >= 200 px) and is zero-padded to
  400x400; smaller remainders are dropped (YELL crop2: 6x6 tiles, YELL crop: 3x3);
* boxes are clipped to the tile; a box is kept when at least half of its area lies inside
  the tile;
* tiles without any box are dropped (2 YELL crop2 tiles).

This gives 45 tiles with 918 boxes. Tile names: ``<image stem>_x<col px>_y<row px>.png``.

Split (fixed, documented): the 45 tile names are sorted, shuffled with
``random.Random(0).shuffle``, and the first 9 form ``val``, the remaining 36 ``train``
(36/9 tiles, a random tile split with seed 0 over the sorted tile names). Both YELL crops
and the two 400 px sites can fall on either side. Folds for repeated comparisons: fold ``k``
(0, 1, 2) validates on tiles ``9k .. 9k + 8`` of the same order and trains on the other 36
(three disjoint validation sets; fold 0 is the split above).

Output (``--out``, default ``data/trees``)::

    images/*.png
    annotations/instances_train.json      # COCO instances, one category {id 1, 'tree'}
    annotations/instances_val.json
    annotations/instances_all.json        # every tile (45)
    annotations/instances_{train,val}_fold{0,1,2}.json   # the three folds
    annotations/split.json                # the split and the tiling parameters

Idempotent: complete output (the same split) is kept; otherwise everything is written to a
temporary folder next to ``--out`` and moved into place at the end.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import os.path as osp
import random
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile

import numpy as np

WHEEL = 'deepforest==2.1.0'
WHEEL_GLOB = 'deepforest-2.1.0-*.whl'
SOURCES = ('2019_YELL_2_528000_4978000_image_crop2', '2019_YELL_2_541000_4977000_image_crop',
           'OSBS_029', 'SOAP_061')
TILE = 400
MIN_EDGE = TILE // 2          # keep an edge tile when the image covers >= half of it
MIN_INSIDE = 0.5              # keep a box when >= half of its area is inside the tile
VAL_TILES = 9
SEED = 0
FOLDS = 3          # disjoint validation folds of VAL_TILES tiles (fold 0 = the split)
CATEGORIES = [dict(id=1, name='tree', supercategory='plant')]
EXPECTED = dict(tiles=45, boxes=918)


def fetch_wheel(wheel_dir: str) -> str:
    """The deepforest wheel in ``wheel_dir`` (downloaded with pip when missing)."""
    found = sorted(glob.glob(osp.join(wheel_dir, WHEEL_GLOB)))
    if found:
        return found[0]
    os.makedirs(wheel_dir, exist_ok=True)
    cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--disable-pip-version-check',
           '-q', WHEEL, '-d', wheel_dir]
    print('deepforest_trees: ' + ' '.join(cmd[2:]), flush=True)
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    found = sorted(glob.glob(osp.join(wheel_dir, WHEEL_GLOB)))
    if r.returncode or not found:
        sys.exit(f'deepforest_trees: could not download {WHEEL}:\n{r.stdout}')
    return found[0]


def extract(wheel: str, dest: str) -> str:
    """Unzip only ``deepforest/data/<source>.{png,xml}``; return the data folder."""
    want = {f'deepforest/data/{s}.{e}' for s in SOURCES for e in ('png', 'xml')}
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        missing = sorted(want - names)
        if missing:
            sys.exit(f'deepforest_trees: {wheel} lacks {missing}')
        for n in sorted(want):
            z.extract(n, dest)
    return osp.join(dest, 'deepforest', 'data')


def read_voc(path: str) -> tuple[int, int, np.ndarray]:
    root = ET.parse(path).getroot()
    w, h = int(root.find('size/width').text), int(root.find('size/height').text)
    boxes = [[float(o.find(f'bndbox/{k}').text) for k in ('xmin', 'ymin', 'xmax', 'ymax')]
             for o in root.findall('object')]
    return w, h, np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def tile_origins(size: int) -> list[int]:
    return [o for o in range(0, size, TILE) if size - o >= MIN_EDGE]


def tile_boxes(boxes: np.ndarray, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """Boxes of the tile at (x0, y0) in tile coordinates, clipped to the tile and the image;
    only boxes with at least ``MIN_INSIDE`` of their area inside."""
    x1, y1 = min(x0 + TILE, w), min(y0 + TILE, h)
    c = boxes.copy()
    c[:, [0, 2]] = c[:, [0, 2]].clip(x0, x1)
    c[:, [1, 3]] = c[:, [1, 3]].clip(y0, y1)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    inside = (c[:, 2] - c[:, 0]).clip(0) * (c[:, 3] - c[:, 1]).clip(0)
    keep = (area > 0) & (inside >= MIN_INSIDE * area)
    return c[keep] - np.array([x0, y0, x0, y0], dtype=np.float64)


def make_tiles(data_dir: str, img_dir: str) -> list[dict]:
    """Write the tiles as PNG into ``img_dir``; return ``[{file_name, boxes}]``."""
    import cv2
    tiles = []
    for stem in SOURCES:
        img = cv2.imread(osp.join(data_dir, stem + '.png'), cv2.IMREAD_COLOR)
        if img is None:
            sys.exit(f'deepforest_trees: cannot read {stem}.png')
        w, h, boxes = read_voc(osp.join(data_dir, stem + '.xml'))
        if (img.shape[1], img.shape[0]) != (w, h):
            sys.exit(f'deepforest_trees: {stem}: image {img.shape[1]}x{img.shape[0]} but xml '
                     f'says {w}x{h}')
        for y0 in tile_origins(h):
            for x0 in tile_origins(w):
                b = tile_boxes(boxes, x0, y0, w, h)
                if not len(b):
                    continue
                tile = np.zeros((TILE, TILE, 3), np.uint8)
                crop = img[y0:y0 + TILE, x0:x0 + TILE]
                tile[:crop.shape[0], :crop.shape[1]] = crop
                name = f'{stem}_x{x0:04d}_y{y0:04d}.png'
                if not cv2.imwrite(osp.join(img_dir, name), tile):
                    sys.exit(f'deepforest_trees: cannot write {name}')
                tiles.append(dict(file_name=name, boxes=b))
    return tiles


def _order(names: list[str]) -> list[str]:
    order = sorted(names)
    random.Random(SEED).shuffle(order)
    return order


def split(names: list[str]) -> dict[str, list[str]]:
    order = _order(names)
    return dict(val=sorted(order[:VAL_TILES]), train=sorted(order[VAL_TILES:]))


def folds(names: list[str]) -> list[dict[str, list[str]]]:
    """:data:`FOLDS` disjoint validation folds: fold ``k`` validates on tiles
    ``9k .. 9k + 8`` of the seeded order and trains on the other 36 (fold 0 = :func:`split`)."""
    order = _order(names)
    out = []
    for k in range(FOLDS):
        val = order[k * VAL_TILES:(k + 1) * VAL_TILES]
        out.append(dict(val=sorted(val), train=sorted(n for n in order if n not in val)))
    return out


def coco(tiles: list[dict]) -> dict:
    images, anns = [], []
    for i, t in enumerate(sorted(tiles, key=lambda t: t['file_name']), 1):
        images.append(dict(id=i, file_name=t['file_name'], width=TILE, height=TILE))
        for x0, y0, x1, y1 in t['boxes'].tolist():
            bw, bh = x1 - x0, y1 - y0
            anns.append(dict(id=len(anns) + 1, image_id=i, category_id=1,
                             bbox=[round(x0, 2), round(y0, 2), round(bw, 2), round(bh, 2)],
                             area=round(bw * bh, 2), iscrowd=0))
    return dict(info=dict(description='DeepForest (deepforest==2.1.0 wheel) NEON tree crowns, '
                          '400x400 tiles', version='1.0'),
                licenses=[], images=images, annotations=anns, categories=CATEGORIES)


def complete(out: str) -> bool:
    try:
        with open(osp.join(out, 'annotations', 'split.json')) as f:
            meta = json.load(f)
        names = meta['train'] + meta['val']
        return (meta.get('tile') == TILE and meta.get('seed') == SEED
                and len(meta['val']) == VAL_TILES
                and all(osp.isfile(osp.join(out, 'annotations', f'instances_{s}.json'))
                        for s in ('train', 'val', 'all', *(f'{p}_fold{k}' for k in
                                                          range(FOLDS) for p in
                                                          ('train', 'val'))))
                and all(osp.isfile(osp.join(out, 'images', n)) for n in names))
    except (OSError, ValueError, KeyError):
        return False


def build(out: str, wheel_dir: str | None = None) -> dict:
    parent = osp.dirname(osp.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f'.{osp.basename(osp.abspath(out))}.tmp-', dir=parent)
    try:
        wheel = fetch_wheel(wheel_dir or osp.join(tmp, 'wheel'))
        data_dir = extract(wheel, osp.join(tmp, 'src'))
        stage = osp.join(tmp, 'stage')
        os.makedirs(osp.join(stage, 'images'))
        os.makedirs(osp.join(stage, 'annotations'))
        tiles = make_tiles(data_dir, osp.join(stage, 'images'))
        parts = split([t['file_name'] for t in tiles])
        by_name = {t['file_name']: t for t in tiles}
        fold_parts = folds([t['file_name'] for t in tiles])
        per_fold = [(f'{p}_fold{k}', names) for k, fp in enumerate(fold_parts)
                    for p, names in fp.items()]
        for s, names in (('all', sorted(by_name)), *parts.items(), *per_fold):
            with open(osp.join(stage, 'annotations', f'instances_{s}.json'), 'w') as f:
                json.dump(coco([by_name[n] for n in names]), f)
        nbox = {s: sum(len(by_name[n]['boxes']) for n in names) for s, names in parts.items()}
        meta = dict(tile=TILE, min_edge=MIN_EDGE, min_inside=MIN_INSIDE, seed=SEED,
                    source=WHEEL, sources=list(SOURCES), num_tiles=len(tiles),
                    num_boxes=sum(nbox.values()), boxes_per_split=nbox, **parts,
                    folds=[fp['val'] for fp in fold_parts])
        with open(osp.join(stage, 'annotations', 'split.json'), 'w') as f:
            json.dump(meta, f, indent=1)
        if (len(tiles), meta['num_boxes']) != (EXPECTED['tiles'], EXPECTED['boxes']):
            print(f'deepforest_trees: warning: {len(tiles)} tiles / {meta["num_boxes"]} boxes, '
                  f'expected {EXPECTED["tiles"]} / {EXPECTED["boxes"]}', file=sys.stderr)
        old = None
        if osp.exists(out):
            old = out.rstrip('/') + f'.old-{os.getpid()}'
            os.rename(out, old)
        os.rename(stage, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return meta
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--out', default='data/trees', help='output folder')
    ap.add_argument('--wheel-dir', help='folder holding (or to download) the deepforest wheel; '
                    'default: a temporary folder')
    ap.add_argument('--force', action='store_true', help='rebuild even when complete')
    args = ap.parse_args(argv)
    if not args.force and complete(args.out):
        print(f'DeepForest tree tiles already in {args.out}')
        return 0
    meta = build(args.out, args.wheel_dir)
    print(f'DeepForest tree tiles in {args.out}: {meta["num_tiles"]} tiles, '
          f'{meta["num_boxes"]} boxes; train {len(meta["train"])} tiles '
          f'({meta["boxes_per_split"]["train"]} boxes), val {len(meta["val"])} tiles '
          f'({meta["boxes_per_split"]["val"]} boxes)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
