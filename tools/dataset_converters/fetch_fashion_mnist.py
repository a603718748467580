#!/usr/bin/env python
"""Fetch Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (MIT, Zalando) and
lay it out for mmpretrain's ``FashionMNIST`` dataset (gunzipped idx files).

    python tools/dataset_converters/fetch_fashion_mnist.py [--out data/fashion_mnist]

Uses the installed package when ``/usr/share/datasets/fashion-mnist`` exists, otherwise
``apt-get download`` + ``dpkg -x`` into a temporary folder (no system change; runs
``apt-get update`` once if the package is unknown). Idempotent: existing complete output is
kept. Files are written to a temporary folder and moved into place at the end.
"""
import argparse
import gzip
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FILES = ['train-images-idx3-ubyte', 'train-labels-idx1-ubyte',
         't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte']
SIZES = {'train-images-idx3-ubyte': 47040016, 'train-labels-idx1-ubyte': 60008,
         't10k-images-idx3-ubyte': 7840016, 't10k-labels-idx1-ubyte': 10008}
SYSTEM_DIR = Path('/usr/share/datasets/fashion-mnist')
PACKAGE = 'dataset-fashion-mnist'


def complete(out: Path) -> bool:
    return all((out / f).is_file() and (out / f).stat().st_size == SIZES[f] for f in FILES)


def _run(cmd, **kw):
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, **kw)


def extract_package(tmp: Path) -> Path:
    """Download the .deb and unpack it under ``tmp``; return the data folder."""
    def download():
        return _run(['apt-get', 'download', PACKAGE], cwd=tmp)
    try:
        download()
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        if isinstance(e, FileNotFoundError):
            sys.exit('fetch_fashion_mnist: apt-get not found; install the Debian package '
                     f'{PACKAGE} or put the four idx files in the output folder')
        print('apt-get download failed, running apt-get update once ...', flush=True)
        try:
            _run(['apt-get', 'update', '-qq'])
            download()
        except subprocess.CalledProcessError as e2:
            sys.exit(f'fetch_fashion_mnist: could not download {PACKAGE}:\n{e2.stdout}')
    deb = next(tmp.glob(f'{PACKAGE}_*.deb'))
    _run(['dpkg', '-x', str(deb), str(tmp / 'root')])
    return tmp / 'root' / SYSTEM_DIR.relative_to('/')


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--out', default='data/fashion_mnist', help='output folder')
    args = ap.parse_args(argv)
    out = Path(args.out)
    if complete(out):
        print(f'Fashion-MNIST already in {out}')
        return 0
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        src = SYSTEM_DIR if all((SYSTEM_DIR / f'{f}.gz').is_file() for f in FILES) \
            else extract_package(tmp)
        stage = tmp / 'stage'
        stage.mkdir()
        for f in FILES:
            with gzip.open(src / f'{f}.gz', 'rb') as fi, open(stage / f, 'wb') as fo:
                shutil.copyfileobj(fi, fo)
        if not complete(stage):
            sys.exit(f'fetch_fashion_mnist: unexpected file sizes in {src}')
        out.mkdir(parents=True, exist_ok=True)
        for f in FILES:
            shutil.move(str(stage / f), str(out / f))
    print(f'Fashion-MNIST written to {out} (60,000 train + 10,000 test images)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
