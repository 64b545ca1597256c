"""Restore one photograph with several trained runs and put the results side by side.

    python bench/restore_photo.py RUN [RUN ...] -o photo.png [--sigma 25] [--size 256]

The photograph is scikit-image's astronaut (not in the embedded training set), resized to
``--size`` and given Gaussian noise of ``--sigma`` (on the 0-255 scale, seeded). Each panel is a
run's restoration (clipped to [0, 1] for display) with its PSNR and the range of the raw output:
values far outside [0, 1], or the same blobs in every panel, are the artefacts to look for.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch


def noisy_astronaut(size: int, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    import torch.nn.functional as F
    from skimage import data

    clean = torch.from_numpy(data.astronaut()).permute(2, 0, 1).float().div(255).unsqueeze(0)
    clean = F.interpolate(clean, size=(size, size), mode="area")[0]
    g = torch.Generator().manual_seed(0)
    noisy = (clean + sigma / 255.0 * torch.randn(clean.shape, generator=g)).clamp(0, 1)
    return noisy, clean


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--sigma", type=float, default=25.0)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cpl_fast.inference.restoration import restore_image
    from cpl_fast.metrics.image import psnr
    from cpl_fast.runs.loading import load_model

    noisy, clean = noisy_astronaut(args.size, args.sigma)
    panels = [("input", noisy, psnr(noisy.unsqueeze(0), clean.unsqueeze(0)), None)]
    for run in args.runs:
        model = load_model(run).model
        out = restore_image(model, noisy).image[0].float()
        panels.append((run.name, out.clamp(0, 1), psnr(out.clamp(0, 1).unsqueeze(0), clean.unsqueeze(0)),
                       (float(out.min()), float(out.max()))))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    for ax, (name, image, score, value_range) in zip(axes[0], panels):
        ax.imshow(image.permute(1, 2, 0).numpy())
        span = "" if value_range is None else f"\nraw output in [{value_range[0]:.2f}, {value_range[1]:.2f}]"
        ax.set_title(f"{name}: {score:.2f} dB{span}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"astronaut, Gaussian noise sigma {args.sigma:g}")
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=100)
    plt.close(fig)
    for name, _, score, value_range in panels:
        print(f"{name}: {score:.2f} dB" + ("" if value_range is None else f", raw output {value_range}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
