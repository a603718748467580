"""Fixtures shared by the test modules; builders and tools are in ``helpers.py`` (this
folder is on ``sys.path`` because this file is pytest's root conftest)."""
from __future__ import annotations

import json
import os.path as osp

import numpy as np
import pytest

from helpers import NUM_CLASSES, TREES


@pytest.fixture(scope='session')
def data_root(tmp_path_factory):
    """3 classes of 32x32 PNGs (colour-coded, noisy): 12 per class train, 6 per class val."""
    cv2 = pytest.importorskip('cv2')
    root = tmp_path_factory.mktemp('pngs')
    rng = np.random.default_rng(0)
    for split, n in (('train', 12), ('val', 6)):
        for c in range(NUM_CLASSES):
            d = root / split / f'class{c}'
            d.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 80, (32, 32, 3), dtype=np.uint8)
                img[..., c] += 120
                cv2.imwrite(str(d / f'{i}.png'), img)
    return str(root)


@pytest.fixture(scope='session')
def trees():
    """The real tree tiles (``data/trees``, written by
    ``tools/dataset_converters/deepforest_trees.py``; ``tools/run_tests.sh`` fetches them)."""
    ann = osp.join(TREES, 'annotations', 'instances_train.json')
    if not osp.isfile(ann):
        pytest.fail('data/trees missing: run tools/dataset_converters/deepforest_trees.py '
                    '(tools/run_tests.sh does)')
    with open(osp.join(TREES, 'annotations', 'split.json')) as f:
        meta = json.load(f)
    assert (meta['num_tiles'], meta['num_boxes']) == (45, 918)
    assert (len(meta['train']), len(meta['val'])) == (36, 9)
    return TREES
