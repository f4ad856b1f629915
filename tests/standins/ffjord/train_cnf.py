"""Stand-in for FFJORD's ``train_cnf.py``: LR warm-up over ``optimizer.param_groups``, gradient clipping over
``model.parameters()``, ``--time_penalty``, ``--resume`` through ``torch.load`` and per-epoch validation with
``np.mean`` over a list of tensors, as upstream. Toy vectors instead of images (no torchvision).
"""

import argparse
import os
import time

import lib.toy_data as toy_data
import lib.utils as utils
import numpy as np
import torch
import torch.optim as optim
from train_misc import (
    build_model_tabular,
    count_nfe,
    count_total_time,
    set_cnf_options,
    standard_normal_logprob,
)

parser = argparse.ArgumentParser("Continuous Normalizing Flow (stand-in)")
parser.add_argument("--data", type=str, default="8gaussians")
parser.add_argument("--dims", type=str, default="16-16")
parser.add_argument("--num_blocks", type=int, default=2)
parser.add_argument("--divergence_fn", type=str, default="approximate")
parser.add_argument("--solver", type=str, default="dopri5")
parser.add_argument("--atol", type=float, default=1e-5)
parser.add_argument("--rtol", type=float, default=1e-5)
parser.add_argument("--step_size", type=float, default=None)
parser.add_argument("--test_solver", type=str, default=None)
parser.add_argument("--test_atol", type=float, default=None)
parser.add_argument("--test_rtol", type=float, default=None)
parser.add_argument("--time_length", type=float, default=1.0)
parser.add_argument("--train_T", type=eval, default=True)
parser.add_argument("--num_epochs", type=int, default=1000)
parser.add_argument(
    "--ntrain", type=int, default=64, help="stand-in only: size of the training set"
)
parser.add_argument("--batch_size", type=int, default=16)
parser.add_argument("--lr", type=float, default=1e-3)
parser.add_argument("--warmup_iters", type=float, default=1000)
parser.add_argument("--weight_decay", type=float, default=0.0)
parser.add_argument("--time_penalty", type=float, default=0)
parser.add_argument("--max_grad_norm", type=float, default=1e10)
parser.add_argument("--resume", type=str, default=None)
parser.add_argument("--save", type=str, default="experiments/cnf")
parser.add_argument("--val_freq", type=int, default=1)
parser.add_argument("--log_freq", type=int, default=10)
args = parser.parse_args()

utils.makedirs(args.save)
logger = utils.get_logger(
    logpath=os.path.join(args.save, "logs"), filepath=os.path.abspath(__file__)
)


def update_lr(optimizer, itr):
    lr = args.lr * min(float(itr + 1) / max(args.warmup_iters, 1), 1.0)
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr


def compute_bits_per_dim(x, model):
    z, delta_logp = model(x, torch.zeros(x.shape[0], 1).to(x))
    logpx = standard_normal_logprob(z).view(z.shape[0], -1).sum(1, keepdim=True) - delta_logp
    return -torch.sum(logpx) / x.nelement() / np.log(2)


if __name__ == "__main__":
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    rng = np.random.default_rng(0)
    train_set = torch.from_numpy(
        toy_data.inf_train_gen(args.data, rng=rng, batch_size=args.ntrain)
    )
    test_set = torch.from_numpy(
        toy_data.inf_train_gen(args.data, rng=rng, batch_size=args.batch_size)
    )
    model = build_model_tabular(args, 2)
    set_cnf_options(args, model)
    optimizer = optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    if args.resume is not None:
        checkpt = torch.load(args.resume, map_location=lambda storage, loc: storage)
        model.load_state_dict(checkpt["state_dict"])
        if "optim_state_dict" in checkpt.keys():
            optimizer.load_state_dict(checkpt["optim_state_dict"])
    if torch.cuda.is_available():
        model = torch.nn.DataParallel(model).cuda()

    best_loss, itr = float("inf"), 0
    for epoch in range(1, args.num_epochs + 1):
        model.train()
        for x in torch.split(train_set, args.batch_size):
            start = time.time()
            update_lr(optimizer, itr)
            optimizer.zero_grad()
            loss = compute_bits_per_dim(x.to(device), model)
            total_time = count_total_time(model)
            loss = loss + total_time * args.time_penalty
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            if itr % args.log_freq == 0:
                logger.info(
                    f"Iter {itr:04d} | Time {time.time() - start:.4f} | Bit/dim {loss.item():.4f} | "
                    f"Steps {count_nfe(model):.0f} | Grad Norm {grad_norm.item():.4f} | Total Time {total_time.item():.2f}"
                )
            itr += 1
        model.eval()
        if epoch % args.val_freq == 0:
            with torch.no_grad():
                loss = np.mean(
                    [
                        compute_bits_per_dim(x.to(device), model)
                        for x in torch.split(test_set, args.batch_size)
                    ]
                )
                logger.info(f"Epoch {epoch:04d} | Bit/dim {loss:.4f}")
                if loss < best_loss:
                    best_loss = loss
                    torch.save(
                        {
                            "args": args,
                            "state_dict": model.state_dict(),
                            "optim_state_dict": optimizer.state_dict(),
                        },
                        os.path.join(args.save, "checkpt.pth"),
                    )
