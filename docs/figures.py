"""Draws docs/branches.png: which raw tokens each query reaches through NSA's three branches.

Run: python docs/figures.py  (CPU, a few seconds; uses the reference backend on random inputs)
"""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import nsa  # noqa: E402


def branch_masks(T: int, config: nsa.NSAConfig, seed: int = 0):
    """[T, T] maps (query t, raw token u) for each branch: 1 where u is reached, else 0.

    Compressed: u is covered by a compressed token visible to t. Selected: u lies in one of the
    blocks select_blocks picked for t (random queries and keys), u <= t. Window: t - w < u <= t.
    """
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(T)[:, None]
    u = torch.arange(T)[None, :]
    Tc = config.num_cmp_tokens(T)
    ends = torch.arange(Tc) * config.cmp_stride + config.cmp_block  # token i covers [i*d, i*d + l)
    covered_until = torch.zeros(T, dtype=torch.long)  # last raw token covered by a visible compressed token, + 1
    for i_end in ends.tolist():
        covered_until[i_end - 1:] = i_end
    cmp = (u < covered_until[:, None]).float()
    q = torch.randn(1, T, 1, 16, generator=g)
    k_cmp = torch.randn(1, Tc, 1, 16, generator=g)
    ids = nsa.select_blocks(q, k_cmp, config)[0, :, 0]  # [T, n], -1 never matches a block
    blocks = u // config.slc_block  # [1, T]
    slc = ((blocks[..., None] == ids[:, None, :]).any(-1) & (u <= t)).float()
    swa = ((u <= t) & (u > t - config.window)).float()
    return cmp, slc, swa


def main(out: Path = Path(__file__).with_name("branches.png")) -> None:
    T = 256
    config = nsa.NSAConfig(cmp_block=16, cmp_stride=8, slc_block=32, num_selected=5, window=48)
    masks = branch_masks(T, config)
    titles = [f"compressed (l={config.cmp_block}, d={config.cmp_stride})\ncoarse view of all the past",
              f"selected (top-{config.num_selected} blocks of {config.slc_block})\nfine view of what the query picked",
              f"sliding window (w={config.window})\nfine view of the recent past"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.6), sharey=True)
    for ax, mask, title, cmap in zip(axes, masks, titles, ["Blues", "Oranges", "Greens"]):
        ax.imshow(mask, cmap=cmap, vmin=0, vmax=1.3, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("key position u")
    axes[0].set_ylabel("query position t")
    fig.suptitle(f"Native Sparse Attention: the raw tokens each query reaches, per branch (T={T}, random inputs)")
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(out, dpi=110)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
