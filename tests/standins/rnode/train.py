"""Stand-in for RNODE's ``train.py``: ``--optimizer adam|sgd``, LR warm-up over ``optimizer.param_groups``,
``clip_grad_norm_(model.parameters())``, per-sample regularisation states averaged into the loss, metrics through
``dist_utils.sum_tensor``, checkpoints with ``optim_state_dict``, and a ``__main__`` that ignores UserWarnings, catches every
exception and prints its traceback to stdout, as upstream. Differences: toy vectors instead of images, ``.to(device)``
instead of upstream's hard-coded ``.cuda()``, ``--niters`` instead of epochs over a data loader.
"""

import argparse
import os
import sys
import time
import traceback
import warnings

import dist_utils
import lib.layers as layers
import lib.utils as utils
import torch
import torch.optim as optim
from train_misc import (
    count_nfe,
    count_total_time,
    create_regularization_fns,
    set_cnf_options,
    standard_normal_logprob,
)

parser = argparse.ArgumentParser("Continuous Normalizing Flow (stand-in)")
parser.add_argument("--data", type=str, default="toy", choices=["toy"])
parser.add_argument("--dims", type=str, default="16,16")
parser.add_argument("--num_blocks", type=int, default=2)
parser.add_argument("--divergence_fn", type=str, default="approximate")
parser.add_argument("--solver", type=str, default="dopri5")
parser.add_argument("--optimizer", type=str, default="adam", choices=["adam", "sgd"])
parser.add_argument("--atol", type=float, default=1e-5)
parser.add_argument("--rtol", type=float, default=1e-5)
parser.add_argument("--step_size", type=float, default=0.25)
parser.add_argument("--test_solver", type=str, default=None)
parser.add_argument("--test_atol", type=float, default=None)
parser.add_argument("--test_rtol", type=float, default=None)
parser.add_argument("--test_step_size", type=float, default=None)
parser.add_argument("--time_length", type=float, default=1.0)
parser.add_argument("--train_T", type=eval, default=False)
parser.add_argument("--niters", type=int, default=4, help="stand-in only")
parser.add_argument("--batch_size", type=int, default=16)
parser.add_argument("--lr", type=float, default=1e-3)
parser.add_argument("--warmup_iters", type=float, default=1000)
parser.add_argument("--weight_decay", type=float, default=0.0)
parser.add_argument("--kinetic-energy", type=float, default=None)
parser.add_argument("--jacobian-norm2", type=float, default=None)
parser.add_argument("--max_grad_norm", type=float, default=float("inf"))
parser.add_argument("--save", type=str, default="experiments/cnf")
parser.add_argument("--log_freq", type=int, default=1)
args = parser.parse_args()


def update_lr(optimizer, itr):
    lr = args.lr * min(float(itr + 1) / max(args.warmup_iters, 1), 1.0)
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr


def compute_bits_per_dim(x, model):
    z, delta_logp, reg_states = model(x, torch.zeros(x.shape[0], 1).to(x))
    reg_states = tuple(torch.mean(rs) for rs in reg_states)
    logpx = standard_normal_logprob(z).view(z.shape[0], -1).sum(1, keepdim=True) - delta_logp
    return -torch.sum(logpx) / x.nelement() / 0.6931471805599453, (x, z), reg_states


def main():
    utils.makedirs(args.save)
    logger = utils.get_logger(
        logpath=os.path.join(args.save, "logs"), filepath=os.path.abspath(__file__)
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    regularization_fns, regularization_coeffs = create_regularization_fns(args)
    hidden = tuple(map(int, args.dims.split(",")))

    def build_cnf():
        odefunc = layers.ODEfunc(layers.ODEnet(hidden, (2,)), divergence_fn=args.divergence_fn)
        return layers.CNF(
            odefunc,
            T=args.time_length,
            train_T=args.train_T,
            regularization_fns=regularization_fns,
        )

    model = layers.SequentialFlow([build_cnf() for _ in range(args.num_blocks)]).to(device)
    set_cnf_options(args, model)
    if args.optimizer == "adam":
        optimizer = optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    else:
        optimizer = optim.SGD(
            model.parameters(), lr=args.lr, weight_decay=args.weight_decay, momentum=0.9
        )
    gen = torch.Generator().manual_seed(0)
    for itr in range(args.niters):
        start = time.time()
        update_lr(optimizer, itr)
        optimizer.zero_grad()
        x = (torch.randn(args.batch_size, 2, generator=gen) * 0.5 + 1.0).to(device)
        bpd, _, reg_states = compute_bits_per_dim(x, model)
        loss = bpd
        if regularization_coeffs:
            loss = loss + sum(r * c for r, c in zip(reg_states, regularization_coeffs) if c != 0)
        total_time = count_total_time(model)
        loss.backward()
        nfe_opt = count_nfe(model)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        metrics = (
            torch.tensor([1.0, loss.item(), bpd.item(), nfe_opt, grad_norm.item()])
            .float()
            .to(device)
        )
        _, r_loss, r_bpd, r_nfe, r_grad = dist_utils.sum_tensor(metrics).cpu().numpy()
        if itr % args.log_freq == 0:
            logger.info(
                f"Itr {itr:06d} | Time/Itr {time.time() - start:.2f} | BPD {r_bpd:.2f} | Loss {r_loss:.2f} | "
                f"FE {r_nfe:.0f} | Grad Norm {r_grad:.3e} | TT {total_time.item():.2f}"
            )
    model.eval()
    torch.save(
        {
            "args": args,
            "state_dict": model.state_dict(),
            "optim_state_dict": optimizer.state_dict(),
        },
        os.path.join(args.save, "checkpt.pth"),
    )


if __name__ == "__main__":
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=UserWarning)
            main()
    except Exception:
        traceback.print_tb(sys.exc_info()[2], file=sys.stdout)
