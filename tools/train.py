"""Train a (RepQ) model: mmpretrain's ``tools/train.py`` (same flags) plus conveniences.

The config is taken as it is (a RepQ config declares ``model = dict(type='RepQModel', ...)``
itself), so mmpretrain's / mmdet's own ``tools/train.py`` train the same model from it. What
this one adds: distributed training on CPU ranks (gloo, ``CPUCompatibleDDP``, see
``repq_mm.mm.ddp``), ``repq_mm`` in ``custom_imports`` when missing, a default scope, and
``persistent_workers`` switched off with ``num_workers=0`` (see ``repq_mm.mm.cli``), and
``--amp`` on a machine without a GPU (``CPUAmpOptimWrapper``, bfloat16 autocast).

    python tools/train.py CONFIG [--work-dir DIR] [--resume [auto|CKPT]] [--amp] ...
"""
import argparse
import os.path as osp
import sys
from copy import deepcopy

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # a checkout

from mmengine.config import Config, ConfigDict, DictAction
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from repq_mm.mm import cli as _common  # noqa: E402
from repq_mm.mm.ddp import setup_cpu_distributed  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train a model (RepQ)')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument(
        '--resume', nargs='?', type=str, const='auto',
        help='If specify checkpoint path, resume from it, while if not specify, try to '
        'auto resume from the latest checkpoint in the work directory.')
    parser.add_argument('--amp', action='store_true',
                        help='enable automatic-mixed-precision training')
    parser.add_argument('--no-validate', action='store_true',
                        help='whether not to evaluate the checkpoint during training')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='whether to auto scale the learning rate according to the '
                        'actual batch size and the original batch size.')
    parser.add_argument('--no-pin-memory', action='store_true',
                        help='whether to disable the pin_memory option in dataloaders.')
    parser.add_argument('--no-persistent-workers', action='store_true',
                        help='whether to disable the persistent_workers option in '
                        'dataloaders.')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override some settings in the used config, the key-value pair in xxx=yyy '
        'format will be merged into config file. If the value to be overwritten is a list, '
        'it should be like key="[a,b]" or key=a,b It also allows nested list/tuple values, '
        'e.g. key="[(a,b),(c,d)]" Note that the quotation marks are necessary and that no '
        'white space is allowed.')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    # torch.distributed.run passes --local-rank
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    _common.set_local_rank(args.local_rank)
    return args


def merge_args(cfg, args):
    """Merge CLI arguments to config (as mmpretrain 1.2.0 does)."""
    if args.no_validate:
        cfg.val_cfg = None
        cfg.val_dataloader = None
        cfg.val_evaluator = None

    cfg.launcher = args.launcher

    # work_dir is determined in this priority: CLI > segment in file > filename
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])

    if args.amp is True:      # mmengine's AmpOptimWrapper; CPUAmpOptimWrapper without a GPU
        from repq_mm.mm.amp import amp_optim_wrapper_type
        cfg.optim_wrapper.type = amp_optim_wrapper_type()
        cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')

    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        cfg.resume = True
        cfg.load_from = args.resume

    if args.auto_scale_lr:
        cfg.auto_scale_lr.enable = True

    default_dataloader_cfg = ConfigDict(
        pin_memory=True, persistent_workers=True, collate_fn=dict(type='default_collate'))

    def set_default_dataloader_cfg(cfg, field):
        if cfg.get(field, None) is None:
            return
        dataloader_cfg = deepcopy(default_dataloader_cfg)
        dataloader_cfg.update(cfg[field])
        cfg[field] = dataloader_cfg
        if args.no_pin_memory:
            cfg[field]['pin_memory'] = False
        if args.no_persistent_workers:
            cfg[field]['persistent_workers'] = False

    set_default_dataloader_cfg(cfg, 'train_dataloader')
    set_default_dataloader_cfg(cfg, 'val_dataloader')
    set_default_dataloader_cfg(cfg, 'test_dataloader')

    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    _common.fix_dataloader_workers(cfg)
    return cfg


def main(argv=None):
    args = parse_args(argv)
    cfg = Config.fromfile(args.config)
    cfg = merge_args(cfg, args)
    cfg = _common.prepare_cfg(cfg)
    setup_cpu_distributed(cfg)   # CPU ranks: gloo, DDP without device_ids

    if 'runner_type' not in cfg:
        runner = Runner.from_cfg(cfg)
    else:
        runner = RUNNERS.build(cfg)
    runner.train()
    return runner


if __name__ == '__main__':
    main()
