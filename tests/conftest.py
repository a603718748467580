"""Fixtures shared by the test modules; builders and tools are in ``helpers.py`` (this
folder is on ``sys.path`` because this file is pytest's root conftest)."""
from __future__ import annotations

import json
import os.path as osp

import pytest

from helpers import TREES, make_pngs


@pytest.fixture(scope='session')
def data_root(tmp_path_factory):
    """3 classes of 32x32 PNGs (colour-coded, noisy): 12 per class train, 6 per class val."""
    pytest.importorskip('cv2')
    return make_pngs(tmp_path_factory.mktemp('pngs'))


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
