"""Test (and evaluate) a (RepQ) model: mmpretrain's ``tools/test.py`` (same flags) plus
conveniences.

The config is taken as it is (a RepQ config declares ``model = dict(type='RepQModel', ...)``
itself), so mmpretrain's / mmdet's own ``tools/test.py`` evaluate the same model from it.
What this one adds: ``CHECKPOINT`` may be ``none`` to evaluate the model as built (e.g. PTQ:
``--cfg-options model.repq.method=ptq model.init_checkpoint=fp.pth``; ``LSQCalibHook``
calibrates before testing), ``repq_mm`` in ``custom_imports`` when missing, a default scope.

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out FILE] ...
"""
import argparse
import os.path as osp
import sys
from copy import deepcopy

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # a checkout

import mmengine  # noqa: E402
from mmengine.config import Config, ConfigDict, DictAction
from mmengine.evaluator import DumpResults
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from repq_mm.mm import cli as _common  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='MMPreTrain test (and eval) a model (RepQ)')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help="checkpoint file ('none': evaluate as built)")
    parser.add_argument('--work-dir',
                        help='the directory to save the file containing evaluation metrics')
    parser.add_argument('--out', help='the file to output results.')
    parser.add_argument('--out-item', choices=['metrics', 'pred'],
                        help='To output whether metrics or predictions. '
                        'Defaults to output predictions.')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override some settings in the used config, the key-value pair in xxx=yyy '
        'format will be merged into config file. If the value to be overwritten is a list, '
        'it should be like key="[a,b]" or key=a,b It also allows nested list/tuple values, '
        'e.g. key="[(a,b),(c,d)]" Note that the quotation marks are necessary and that no '
        'white space is allowed.')
    parser.add_argument('--amp', action='store_true',
                        help='enable automatic-mixed-precision test')
    parser.add_argument('--show-dir',
                        help='directory where the visualization images will be saved.')
    parser.add_argument('--show', action='store_true',
                        help='whether to display the prediction results in a window.')
    parser.add_argument('--interval', type=int, default=1,
                        help='visualize per interval samples.')
    parser.add_argument('--wait-time', type=float, default=2,
                        help='display time of every window. (second)')
    parser.add_argument('--no-pin-memory', action='store_true',
                        help='whether to disable the pin_memory option in dataloaders.')
    parser.add_argument('--tta', action='store_true',
                        help='Whether to enable the Test-Time-Aug (TTA). If the config file '
                        'has `tta_pipeline` and `tta_model` fields, use them to determine the '
                        'TTA transforms and how to merge the TTA results. Otherwise, use flip '
                        'TTA by averaging classification score.')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    _common.set_local_rank(args.local_rank)
    return args


def merge_args(cfg, args):
    """Merge CLI arguments to config (as mmpretrain 1.2.0 does)."""
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    cfg = _common.prepare_cfg(cfg)
    cfg.launcher = args.launcher

    # work_dir is determined in this priority: CLI > segment in file > filename
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])

    cfg.load_from = None if args.checkpoint.lower() == 'none' else args.checkpoint

    if args.amp:
        cfg.test_cfg.fp16 = True

    # -------------------- visualization --------------------
    if args.show or (args.show_dir is not None):
        assert 'visualization' in cfg.default_hooks, \
            'VisualizationHook is not set in the `default_hooks` field of ' \
            'config. Please set `visualization=dict(type="VisualizationHook")`'
        cfg.default_hooks.visualization.enable = True
        cfg.default_hooks.visualization.show = args.show
        cfg.default_hooks.visualization.wait_time = args.wait_time
        cfg.default_hooks.visualization.out_dir = args.show_dir
        cfg.default_hooks.visualization.interval = args.interval

    # -------------------- TTA related args --------------------
    if args.tta:
        if 'tta_model' not in cfg:
            cfg.tta_model = dict(type='mmpretrain.AverageClsScoreTTA')
        if 'tta_pipeline' not in cfg:
            test_pipeline = cfg.test_dataloader.dataset.pipeline
            cfg.tta_pipeline = deepcopy(test_pipeline)
            flip_tta = dict(
                type='TestTimeAug',
                transforms=[
                    [dict(type='RandomFlip', prob=1.), dict(type='RandomFlip', prob=0.)],
                    [test_pipeline[-1]],
                ])
            cfg.tta_pipeline[-1] = flip_tta
        cfg.model = ConfigDict(**cfg.tta_model, module=cfg.model)
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline

    # ----------------- Default dataloader args -----------------
    default_dataloader_cfg = ConfigDict(pin_memory=True,
                                        collate_fn=dict(type='default_collate'))

    def set_default_dataloader_cfg(cfg, field):
        if cfg.get(field, None) is None:
            return
        dataloader_cfg = deepcopy(default_dataloader_cfg)
        dataloader_cfg.update(cfg[field])
        cfg[field] = dataloader_cfg
        if args.no_pin_memory:
            cfg[field]['pin_memory'] = False

    set_default_dataloader_cfg(cfg, 'test_dataloader')
    _common.fix_dataloader_workers(cfg)
    return cfg


def main(argv=None):
    args = parse_args(argv)
    if args.out is None and args.out_item is not None:
        raise ValueError('Please use `--out` argument to specify the '
                         'path of the output file before using `--out-item`.')

    cfg = Config.fromfile(args.config)
    cfg = merge_args(cfg, args)

    if 'runner_type' not in cfg:
        runner = Runner.from_cfg(cfg)
    else:
        runner = RUNNERS.build(cfg)

    if args.out and args.out_item in ['pred', None]:
        runner.test_evaluator.metrics.append(DumpResults(out_file_path=args.out))

    metrics = runner.test()

    if args.out and args.out_item == 'metrics':
        mmengine.dump(metrics, args.out)
    return metrics


if __name__ == '__main__':
    main()
