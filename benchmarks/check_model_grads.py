"""Gradient check of a whole model at an experiment's shape, CUDA only: are the bf16 kernels' gradients in a
training step as close to the float32 oracle as full attention's are to its own?

    python benchmarks/check_model_grads.py [--config experiments/retrieval-8k.toml] [--batch 2] [--seq-len 2048]
                                           [--warm-steps 50] [--layers N]
    TRITON_INTERPRET=1 python benchmarks/check_model_grads.py --device cpu --backend triton --warm-steps 0 \
        --batch 1 --seq-len 1024 --layers 1        (the kernels' float32 math on the CPU, interpreted: minutes)

For attention "nsa" and "full" alike: the experiment's model (same seed) is first trained --warm-steps steps as
`nsa train` trains it (bf16 autocast, AdamW at the config's learning rate; past the initialization, where the
compressed scores are nearly tied and the top-n selection is arbitrary), then the gradients of one batch of text
are taken three ways on --batch windows of --seq-len bytes (the oracle's PyTorch NSA is slow at the config's
8192):
  bf16    the training path: bfloat16 autocast, the default backend (Triton kernels for NSA);
  fp32    float32, no autocast, the same backend;
  oracle  float32, no autocast, NSA on backend="reference" (pure PyTorch); full attention: SDPA's math backend.
On the CPU (--device cpu) there is no bf16 row, and --backend triton makes the fp32 row the interpreted kernels.
Printed per parameter: relative error ||g - g_oracle|| / ||g_oracle|| and cosine similarity of bf16 and fp32 against
the oracle, and the loss of each. The full-attention rows are the yardstick for the noise bf16 itself brings.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import parser, print_header, require_cuda, table
from nsa import LanguageModel
from nsa.cli import read_config_file
from nsa.data import get_batch, load_corpus
from nsa.train import autocast, build_configs, lr_at, make_optimizer


def gradients(model: LanguageModel, x: torch.Tensor, y: torch.Tensor, mode: str) -> tuple[float, dict]:
    """(loss, {parameter name: gradient float32}) of one batch, computed the `mode` way (see the docstring)."""
    nsa_layers = [b.attn for b in model.blocks if hasattr(b.attn, "backend")]
    backends = [layer.backend for layer in nsa_layers]
    if mode == "oracle":
        for layer in nsa_layers:
            layer.backend = "reference"
    model.zero_grad(set_to_none=True)
    try:
        with autocast(x.device) if mode == "bf16" else nullcontext(), \
                sdpa_kernel(SDPBackend.MATH) if mode == "oracle" else nullcontext():
            loss = F.cross_entropy(model(x)[0].float().flatten(0, 1), y.flatten())
        loss.backward()
    finally:
        for layer, backend in zip(nsa_layers, backends):
            layer.backend = backend
    return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def compare(grads: dict, oracle: dict) -> dict:
    """{name: (relative error, cosine)} of grads against the oracle's."""
    out = {}
    for name, g in grads.items():
        o = oracle[name]
        out[name] = ((g - o).norm() / o.norm().clamp_min(1e-30)).item(), F.cosine_similarity(
            g.flatten(), o.flatten(), dim=0).item()
    return out


def main() -> None:
    p = parser(__doc__, out=None, timing=False)
    p.add_argument("--config", default="experiments/retrieval-8k.toml")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--warm-steps", type=int, default=50)
    p.add_argument("--data-max-bytes", type=int, default=20_000_000)
    p.add_argument("--layers", type=int, help="the model's n_layer (default: the config's)")
    p.add_argument("--backend", help="NSA's backend outside the oracle (default: the fastest available)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = p.parse_args()
    if args.device == "cuda":
        require_cuda("check_model_grads.py")
    print_header(f"gradient check of the model of {args.config}, batch {args.batch}, after {args.warm_steps} steps")
    model_cfg, train_cfg = build_configs(read_config_file(args.config))
    model_cfg.n_layer = args.layers or model_cfg.n_layer
    model_cfg.backend = args.backend
    modes = ("bf16", "fp32", "oracle") if args.device == "cuda" else ("fp32", "oracle")
    corpus = load_corpus(train_cfg.data, args.data_max_bytes)
    gen = torch.Generator().manual_seed(0)
    warm = [get_batch(corpus.train, train_cfg.batch_size, train_cfg.seq_len, gen, args.device)
            for _ in range(args.warm_steps)]
    x, y = get_batch(corpus.val, args.batch, args.seq_len, gen, args.device)
    for attention in ("nsa", "full"):
        torch.manual_seed(0)
        model_cfg.attention = attention
        model = LanguageModel(model_cfg).to(args.device)
        opt = make_optimizer(model, train_cfg)
        for step, (wx, wy) in enumerate(warm):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, train_cfg)
            with autocast(wx.device):
                loss = model(wx, wy)[1]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
            opt.step()
        losses, grads = {}, {}
        for mode in modes:
            losses[mode], grads[mode] = gradients(model, x, y, mode)
            print(f"{attention} {mode}: loss {losses[mode]:.5f}", flush=True)
        errors = {mode: compare(grads[mode], grads["oracle"]) for mode in modes[:-1]}
        print(f"\n{attention} after {args.warm_steps} warm-up steps:")
        rows = [[name] + [f"{errors[m][name][i]:{spec}}" for m in errors for i, spec in ((0, ".2e"), (1, ".5f"))]
                for name in grads["oracle"]]
        print(table(["parameter"] + [f"{m} {what}" for m in errors for what in ("rel err", "cos")], rows))
        del model, opt, grads


if __name__ == "__main__":
    main()
