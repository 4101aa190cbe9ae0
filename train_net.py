#!/usr/bin/env python
r"""Train or evaluate a dcnv2 model with detectron2.

    python train_net.py --config-file configs/faster_rcnn_R50_mdconv_FPN_1x.yaml --num-gpus 8
    python train_net.py --config-file configs/faster_rcnn_R50_mdconv_FPN_1x.yaml --eval-only \
        MODEL.WEIGHTS path/to/model_final.pth
    python train_net.py --config-file configs/lazy/mask_rcnn_R50_mdconv_FPN_1x.py \
        train.max_iter=1000 train.device=cpu

A .py (LazyConfig) file runs through dcnv2.engine.lazy; overrides are then key=value.

--eval-only writes its results in OUTPUT_DIR/inference and its config as config_eval.yaml (a
training run's config.yaml stays); it refuses to replace results of other weights there unless
--force (or another OUTPUT_DIR).

Several machines: add --num-machines N --machine-rank R --dist-url tcp://HOST:PORT, or start
one process per GPU with a cluster launcher, which sets --num-gpus, --num-machines and
--machine-rank (leave them out):
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \
        train_net.py --config-file faster_rcnn_R50_mdconv_FPN_1x.yaml
    GPUS=16 bash tools/slurm_train.sh PARTITION JOB_NAME faster_rcnn_R50_mdconv_FPN_1x.yaml
(srun, one task per GPU, with MASTER_ADDR/MASTER_PORT exported; SBATCH=1 submits it).
"""

import contextlib
import functools
import sys

# dcnv2's entry-point layer first: it drops the messages detectron2 and torch print at import
from dcnv2.tools.cli import silence_known_warnings, train_net_parser

# isort: split
import detectron2.utils.comm as comm
from detectron2.engine import launch
from detectron2.evaluation import verify_results
from detectron2.utils.logger import setup_logger
from torch.multiprocessing import ProcessExitedException

import dcnv2
from dcnv2.config import is_lazy_config
from dcnv2.engine import Trainer, lazy
from dcnv2.engine.eval_output import load_eval_weights
from dcnv2.engine.launch import report_user_errors, resolve_launch, run_in_cluster
from dcnv2.engine.preemption import STOP_SIGNALS, forward_stop_signals
from dcnv2.engine.preflight import check_before_launch
from dcnv2.engine.setup import setup_run
from dcnv2.errors import USER_ERROR_EXIT, USER_ERRORS, report_user_error

PROG = "train_net.py"


def setup(args):
    cfg = dcnv2.get_cfg(args.config_file, args.opts)
    cfg.freeze()
    setup_run(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="dcnv2")
    return cfg


def main(args):
    """One process of the run; the launching process has checked the input
    (:func:`dcnv2.engine.preflight.check_before_launch`)."""
    silence_known_warnings()  # in every process of the run
    if is_lazy_config(args.config_file):
        return lazy.main(args)
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        load_eval_weights(cfg, model, args.resume)
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def invoke_main(argv=None) -> None:
    """Parse the command line, check the input once, then launch the processes. A user error
    (:data:`dcnv2.errors.USER_ERRORS`) ends as one ``train_net.py: error: ...`` line and exit
    status 2, as the tools in tools/ do; a run stopped by SIGTERM/SIGINT
    (:mod:`dcnv2.engine.preemption`) ends with status 128 + the signal's number. Started by
    torchrun or srun (:mod:`dcnv2.engine.launch`), this process is one of the run's."""
    args = train_net_parser(__doc__).parse_args(argv)
    try:
        cluster = resolve_launch(args)
        worker = functools.partial(report_user_errors, PROG, main)
        if cluster is not None:
            run_in_cluster(cluster, worker, args, check=check_before_launch)
            return
        several = args.num_gpus * args.num_machines > 1
        check_before_launch(args)
        with forward_stop_signals() if several else contextlib.nullcontext():
            launch(
                worker,
                args.num_gpus,
                num_machines=args.num_machines,
                machine_rank=args.machine_rank,
                dist_url=args.dist_url,
                args=(args,),
            )
    except USER_ERRORS as e:
        sys.exit(report_user_error(PROG, e))
    except ProcessExitedException as e:
        if e.exit_code not in (USER_ERROR_EXIT, *(128 + s for s in STOP_SIGNALS)):
            raise
        sys.exit(e.exit_code)  # a worker printed its error (or where it stopped) and exited


if __name__ == "__main__":
    invoke_main()
