"""Stand-in for FFJORD's ``train_tabular.py``: the repository's own ``lib.custom_optimizers.Adam``, plateau LR decay
over ``optimizer.param_groups``, ``restore_model`` of the best checkpoint before the test. Toy vectors, not the
tabular data sets.
"""

import argparse
import os

import lib.toy_data as toy_data
import lib.utils as utils
import numpy as np
import torch
from lib.custom_optimizers import Adam
from train_misc import build_model_tabular, count_nfe, set_cnf_options, standard_normal_logprob

parser = argparse.ArgumentParser("Continuous Normalizing Flow (stand-in)")
parser.add_argument("--data", type=str, default="8gaussians")
parser.add_argument("--dims", type=str, default="16")
parser.add_argument("--num_blocks", type=int, default=1)
parser.add_argument("--time_length", type=float, default=1.0)
parser.add_argument("--train_T", type=eval, default=True)
parser.add_argument("--divergence_fn", type=str, default="approximate")
parser.add_argument("--solver", type=str, default="dopri5")
parser.add_argument("--atol", type=float, default=1e-8)
parser.add_argument("--rtol", type=float, default=1e-6)
parser.add_argument("--step_size", type=float, default=None)
parser.add_argument("--test_solver", type=str, default=None)
parser.add_argument("--test_atol", type=float, default=None)
parser.add_argument("--test_rtol", type=float, default=None)
parser.add_argument("--batch_size", type=int, default=32)
parser.add_argument("--lr", type=float, default=1e-3)
parser.add_argument("--weight_decay", type=float, default=1e-6)
parser.add_argument(
    "--max_iters", type=int, default=4, help="stand-in only: iterations instead of early stopping"
)
parser.add_argument("--val_freq", type=int, default=2)
parser.add_argument("--save", type=str, default="experiments/cnf")
args = parser.parse_args()

utils.makedirs(args.save)
logger = utils.get_logger(
    logpath=os.path.join(args.save, "logs"), filepath=os.path.abspath(__file__)
)


def compute_loss(x, model):
    z, delta_logp = model(x, torch.zeros(x.shape[0], 1).to(x))
    return -torch.mean(standard_normal_logprob(z).sum(1, keepdim=True) - delta_logp)


def update_lr(optimizer, n_vals_without_improvement):
    if n_vals_without_improvement > 0:
        for param_group in optimizer.param_groups:
            param_group["lr"] = args.lr / 10


def restore_model(model, filename):
    model.load_state_dict(
        torch.load(filename, map_location=lambda storage, loc: storage)["state_dict"]
    )
    return model


if __name__ == "__main__":
    rng = np.random.default_rng(0)
    val = torch.from_numpy(toy_data.inf_train_gen(args.data, rng=rng, batch_size=args.batch_size))
    model = build_model_tabular(args, 2)
    set_cnf_options(args, model)
    optimizer = Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    best_loss, n_vals_without_improvement = float("inf"), 0
    model.train()
    for itr in range(1, args.max_iters + 1):
        optimizer.zero_grad()
        x = torch.from_numpy(
            toy_data.inf_train_gen(args.data, rng=rng, batch_size=args.batch_size)
        )
        loss = compute_loss(x, model)
        loss.backward()
        optimizer.step()
        logger.info(f"Iter {itr:06d} | Loss {loss.item():.6f} | NFE {count_nfe(model):.0f}")
        if itr % args.val_freq == 0:
            model.eval()
            with torch.no_grad():
                val_loss = compute_loss(val, model).item()
            if val_loss < best_loss:
                best_loss, n_vals_without_improvement = val_loss, 0
                torch.save(
                    {"args": args, "state_dict": model.state_dict()},
                    os.path.join(args.save, "checkpt.pth"),
                )
            else:
                n_vals_without_improvement += 1
            update_lr(optimizer, n_vals_without_improvement)
            model.train()
    model = restore_model(model, os.path.join(args.save, "checkpt.pth"))
    model.eval()
    with torch.no_grad():
        logger.info(f"Test loss {compute_loss(val, model).item():.6f}")
