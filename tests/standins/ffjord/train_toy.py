"""Stand-in for FFJORD's ``train_toy.py``: the flags the patch relies on and upstream's loop shape.

Builds the model with ``build_model_tabular``, the optimizer with ``optim.Adam(model.parameters(), ...)``,
logs ``NFE Forward / NFE Backward / CNF Time`` per iteration, validates in eval mode under
``no_grad``, checkpoints ``{'args', 'state_dict'}`` and ends with ``save_trajectory`` and
``trajectory_to_video``. Fewer flags and layer types than upstream; 8gaussians data only.
"""

import argparse
import os
import time

import lib.toy_data as toy_data
import lib.utils as utils
import torch
import torch.optim as optim
from diagnostics.viz_toy import save_trajectory, trajectory_to_video
from train_misc import (
    build_model_tabular,
    count_nfe,
    count_parameters,
    count_total_time,
    create_regularization_fns,
    get_regularization,
    set_cnf_options,
    standard_normal_logprob,
)

parser = argparse.ArgumentParser("Continuous Normalizing Flow (stand-in)")
parser.add_argument("--data", type=str, default="8gaussians")
parser.add_argument("--dims", type=str, default="16-16")
parser.add_argument("--num_blocks", type=int, default=1)
parser.add_argument("--time_length", type=float, default=0.5)
parser.add_argument("--train_T", type=eval, default=True)
parser.add_argument("--divergence_fn", type=str, default="brute_force")
parser.add_argument("--solver", type=str, default="dopri5")
parser.add_argument("--atol", type=float, default=1e-5)
parser.add_argument("--rtol", type=float, default=1e-5)
parser.add_argument("--step_size", type=float, default=None)
parser.add_argument("--test_solver", type=str, default=None)
parser.add_argument("--test_atol", type=float, default=None)
parser.add_argument("--test_rtol", type=float, default=None)
parser.add_argument("--niters", type=int, default=10000)
parser.add_argument("--batch_size", type=int, default=100)
parser.add_argument("--test_batch_size", type=int, default=1000)
parser.add_argument("--lr", type=float, default=1e-3)
parser.add_argument("--weight_decay", type=float, default=1e-5)
parser.add_argument("--l2int", type=float, default=None)
parser.add_argument("--save", type=str, default="experiments/cnf")
parser.add_argument("--viz_freq", type=int, default=100)
parser.add_argument("--val_freq", type=int, default=100)
parser.add_argument("--gpu", type=int, default=0)
args = parser.parse_args()

utils.makedirs(args.save)
logger = utils.get_logger(
    logpath=os.path.join(args.save, "logs"), filepath=os.path.abspath(__file__)
)
logger.info(args)
device = torch.device("cuda:" + str(args.gpu) if torch.cuda.is_available() else "cpu")


def compute_loss(args, model, batch_size=None):
    x = toy_data.inf_train_gen(args.data, batch_size=batch_size or args.batch_size)
    x = torch.from_numpy(x).type(torch.float32).to(device)
    z, delta_logp = model(x, torch.zeros(x.shape[0], 1).to(x))
    logpz = standard_normal_logprob(z).sum(1, keepdim=True)
    return -torch.mean(logpz - delta_logp)


if __name__ == "__main__":
    regularization_fns, regularization_coeffs = create_regularization_fns(args)
    model = build_model_tabular(args, 2, regularization_fns).to(device)
    set_cnf_options(args, model)
    logger.info(f"Number of trainable parameters: {count_parameters(model)}")
    optimizer = optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)

    best_loss = float("inf")
    model.train()
    for itr in range(1, args.niters + 1):
        start = time.time()
        optimizer.zero_grad()
        loss = compute_loss(args, model)
        if len(regularization_coeffs) > 0:
            reg_states = get_regularization(model, regularization_coeffs)
            loss = loss + sum(r * c for r, c in zip(reg_states, regularization_coeffs) if c != 0)
        total_time = count_total_time(model)
        nfe_forward = count_nfe(model)
        loss.backward()
        optimizer.step()
        nfe_backward = count_nfe(model) - nfe_forward
        logger.info(
            f"Iter {itr:04d} | Time {time.time() - start:.4f} | Loss {loss.item():.6f} | NFE Forward {nfe_forward:.0f}"
            f" | NFE Backward {nfe_backward:.0f} | CNF Time {total_time.item():.4f}"
        )
        if itr % args.val_freq == 0 or itr == args.niters:
            with torch.no_grad():
                model.eval()
                test_loss = compute_loss(args, model, batch_size=args.test_batch_size)
                logger.info(
                    f"[TEST] Iter {itr:04d} | Test Loss {test_loss.item():.6f} | NFE {count_nfe(model):.0f}"
                )
                if test_loss.item() < best_loss:
                    best_loss = test_loss.item()
                    torch.save(
                        {"args": args, "state_dict": model.state_dict()},
                        os.path.join(args.save, "checkpt.pth"),
                    )
                model.train()

    logger.info("Training has finished.")
    save_traj_dir = os.path.join(args.save, "trajectory")
    save_trajectory(
        model, toy_data.inf_train_gen(args.data, batch_size=16), save_traj_dir, device=device
    )
    trajectory_to_video(save_traj_dir)
