"""Stand-in for FFJORD's ``diagnostics/viz_toy.py``: trajectories through explicit ``integration_times``, and ffmpeg."""

import os
import subprocess

import numpy as np
import torch

__all__ = ["save_trajectory", "trajectory_to_video"]


def save_trajectory(model, data_samples, savedir, ntimes=5, memory=0.01, device="cpu"):
    model.eval()
    z = torch.randn(16, 2).to(device)
    logp = torch.zeros(16, 1).to(z)
    frames = []
    with torch.no_grad():
        for cnf in model.chain:
            end_time = cnf.sqrt_end_time * cnf.sqrt_end_time
            z_traj, _ = cnf(
                z,
                logp,
                integration_times=torch.linspace(0, end_time.item(), ntimes).to(z),
                reverse=True,
            )
            frames.append(z_traj.cpu().numpy())
    os.makedirs(savedir, exist_ok=True)
    np.save(os.path.join(savedir, "trajectory.npy"), np.stack(frames))


def trajectory_to_video(savedir):
    command = [
        "ffmpeg",
        "-y",
        "-i",
        os.path.join(savedir, "viz-%05d.jpg"),
        os.path.join(savedir, "traj.mp4"),
    ]
    subprocess.Popen(command, stdout=subprocess.PIPE).communicate()
