"""Stand-in for OT-Flow's ``trainToyOTflow.py``: the flags the patch relies on and upstream's loop shape.

``torch.set_default_dtype(prec)``, ``Phi(...)`` moved with ``.to(prec).to(device)``,
``torch.optim.Adam(net.parameters())`` bound to the name ``optim``, the hard-coded span
``[0, 1]`` in ``compute_loss``, validation under ``no_grad``, checkpoint ``{'args', 'state_dict'}``,
``plot4`` every ``viz_freq`` and the LR drop over ``optim.param_groups``. Smaller defaults.
"""

import argparse
import datetime
import os
import time

import config
import lib.toy_data as toy_data
import lib.utils as utils
import numpy as np
import torch
import torch.optim as optim  # noqa: F401  (rebound below, as upstream)
from lib.utils import count_parameters
from src.OTFlowProblem import *  # noqa: F403
from src.plotter import plot4

cf = config.getconfig()
parser = argparse.ArgumentParser("OT-Flow (stand-in)")
parser.add_argument("--data", type=str, default="8gaussians")
parser.add_argument("--nt", type=int, default=4)
parser.add_argument("--nt_val", type=int, default=4)
parser.add_argument("--alph", type=str, default="1.0,100.0,5.0")
parser.add_argument("--m", type=int, default=8)
parser.add_argument("--nTh", type=int, default=2)
parser.add_argument("--niters", type=int, default=4)
parser.add_argument("--batch_size", type=int, default=64)
parser.add_argument("--val_batch_size", type=int, default=64)
parser.add_argument("--lr", type=float, default=0.1)
parser.add_argument("--drop_freq", type=int, default=100)
parser.add_argument("--weight_decay", type=float, default=0.0)
parser.add_argument("--lr_drop", type=float, default=2.0)
parser.add_argument("--optim", type=str, default="adam", choices=["adam"])
parser.add_argument("--prec", type=str, default="single", choices=["single", "double"])
parser.add_argument("--save", type=str, default="experiments/cnf/toy")
parser.add_argument("--viz_freq", type=int, default=100)
parser.add_argument("--val_freq", type=int, default=1)
parser.add_argument("--gpu", type=int, default=0)
parser.add_argument("--sample_freq", type=int, default=25)
args = parser.parse_args()
args.alph = [float(a) for a in args.alph.split(",")]
prec = torch.float64 if args.prec == "double" else torch.float32
start_time = datetime.datetime.now().strftime("%Y_%m_%d_%H_%M_%S")
utils.makedirs(args.save)
logger = utils.get_logger(
    logpath=os.path.join(args.save, "logs"), filepath=os.path.abspath(__file__)
)
device = torch.device("cuda:" + str(args.gpu) if torch.cuda.is_available() else "cpu")


def compute_loss(net, x, nt):
    Jc, cs = OTFlowProblem(x, net, [0, 1], nt=nt, stepper="rk4", alph=net.alph)  # noqa: F405
    return Jc, cs


if __name__ == "__main__":
    torch.set_default_dtype(prec)
    cvt = lambda x: x.type(prec).to(device, non_blocking=True)  # noqa: E731
    net = Phi(nTh=args.nTh, m=args.m, d=2, alph=args.alph)  # noqa: F405
    net = net.to(prec).to(device)
    optim = torch.optim.Adam(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    logger.info(f"Number of trainable parameters: {count_parameters(net)}")
    logger.info(str(optim))
    rng = np.random.default_rng(0)
    x0 = cvt(
        torch.from_numpy(toy_data.inf_train_gen(args.data, rng=rng, batch_size=args.batch_size))
    )
    x0val = cvt(
        torch.from_numpy(
            toy_data.inf_train_gen(args.data, rng=rng, batch_size=args.val_batch_size)
        )
    )
    best_loss = float("inf")
    net.train()
    for itr in range(1, args.niters + 1):
        end = time.time()
        optim.zero_grad()
        loss, costs = compute_loss(net, x0, nt=args.nt)
        loss.backward()
        optim.step()
        log_message = f"{itr:05d}  {time.time() - end:6.3f}   {loss:9.3e}  {costs[0]:9.3e}  {costs[1]:9.3e}  {costs[2]:9.3e}  "
        if itr % args.val_freq == 0 or itr == args.niters:
            with torch.no_grad():
                net.eval()
                test_loss, test_costs = compute_loss(net, x0val, nt=args.nt_val)
                log_message += f"    {test_loss:9.3e}  {test_costs[0]:9.3e}  {test_costs[1]:9.3e}  {test_costs[2]:9.3e} "
                if test_loss.item() < best_loss:
                    best_loss = test_loss.item()
                    best_params = net.state_dict()
                    torch.save(
                        {"args": args, "state_dict": best_params},
                        os.path.join(args.save, start_time + "_checkpt.pth"),
                    )
                net.train()
        logger.info(log_message)
        if itr % args.viz_freq == 0:
            with torch.no_grad():
                net.eval()
                y = cvt(torch.randn(64, 2))
                sPath = os.path.join(args.save, "figs", start_time + f"_{itr:04d}.png")
                utils.makedirs(os.path.dirname(sPath))
                plot4(
                    net,
                    x0val,
                    y,
                    args.nt_val,
                    sPath,
                    doPaths=True,
                    sTitle=f"{args.data} loss {best_loss:.2f}",
                )
                net.train()
        if itr % args.drop_freq == 0:
            for p in optim.param_groups:
                p["lr"] /= args.lr_drop
    logger.info("Training has finished.")
