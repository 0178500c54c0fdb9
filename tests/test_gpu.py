"""What only a GPU can show: the losses on CUDA (float32 and bf16) against float64 references at
realistic vocabulary sizes, megatron-core models on CUDA + NCCL against transformers, and a bf16
training run. Skipped where CUDA is absent (CI never has a GPU); run on a lent GPU with

    python -m pytest -q tests/test_gpu.py
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_convert_models import TOKENS, tiny_hf_model
from test_losses import reference_reverse_kl

from megatron_opd.losses import (
    fused_linear_reverse_kl,
    topk_reverse_kl,
    vocab_parallel_reverse_kl,
)

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"
)

REPO = Path(__file__).resolve().parents[1]
F64 = torch.float64


def _reference_kl(z: torch.Tensor, u: torch.Tensor, temperature: float, vocab: int) -> torch.Tensor:
    return reference_reverse_kl(z, u, temperature, vocab)  # float64, padding excluded


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().to("cpu", F64), b.detach().to("cpu", F64)
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_losses_on_cuda_match_float64(dtype):
    """Realistic sizes (V = 32k with padding, d = 512): loss and gradients vs float64 on the GPU."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    n, d, padded, vocab, temperature = 1024, 512, 32768, 32000, 1.3
    h = (torch.randn(n, d, generator=gen, device="cuda")).to(dtype).requires_grad_(True)
    w = (
        (torch.randn(padded, d, generator=gen, device="cuda") / d**0.5 * 3)
        .to(dtype)
        .requires_grad_(True)
    )
    g = torch.randn(n, d, generator=gen, device="cuda").to(dtype)
    t = (torch.randn(padded, d, generator=gen, device="cuda") / d**0.5 * 3).to(dtype)
    upstream = torch.rand(n, generator=gen, device="cuda")
    upstream[::7] = 0.0  # masked rows

    h64, w64 = (
        h.detach().to(F64).requires_grad_(True),
        w.detach().to(F64).requires_grad_(True),
    )
    ref = _reference_kl(h64 @ w64.T, g.to(F64) @ t.to(F64).T, temperature, vocab)
    ref_h, ref_w = torch.autograd.grad(ref, (h64, w64), upstream.to(F64))

    fused = fused_linear_reverse_kl(
        h, w, g, t, temperature=temperature, vocab_size=vocab, chunk_size=256
    )
    grad_h, grad_w = torch.autograd.grad(fused, (h, w), upstream)
    z = (h.detach() @ w.detach().T).requires_grad_(True)
    unfused = vocab_parallel_reverse_kl(
        z, g @ t.T, temperature=temperature, vocab_size=vocab
    )
    (grad_z,) = torch.autograd.grad(unfused, z, upstream)
    z64 = z.detach().to(F64).requires_grad_(True)
    ref_z_loss = _reference_kl(z64, (g @ t.T).to(F64), temperature, vocab)
    (ref_z,) = torch.autograd.grad(ref_z_loss, z64, upstream.to(F64))

    assert fused.dtype == unfused.dtype == torch.float32
    assert torch.isfinite(fused).all() and torch.isfinite(grad_w).all()
    # float32: matmul rounding only; bf16: the rounding of bf16 logits (~3 significant digits).
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert _rel(fused, ref) < tol, _rel(fused, ref)
    assert _rel(grad_h, ref_h) < 10 * tol, _rel(grad_h, ref_h)
    assert _rel(grad_w, ref_w) < 10 * tol, _rel(grad_w, ref_w)
    # Same (possibly bf16) logits on both sides: only the float32 accumulation differs.
    assert _rel(unfused, ref_z_loss) < 1e-5
    assert _rel(grad_z, ref_z) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_topk_on_cuda_with_k_equal_to_vocab_is_the_full_kl():
    gen = torch.Generator(device="cuda").manual_seed(1)
    n, vocab = 64, 4096
    z = torch.randn(n, vocab, generator=gen, device="cuda").requires_grad_(True)
    u = torch.randn(n, vocab, generator=gen, device="cuda")
    log_q = torch.log_softmax(u, -1)
    top_logq, top_ids = log_q.topk(vocab, dim=-1)
    kl, covered = topk_reverse_kl(z, top_ids, top_logq)
    ref = _reference_kl(z.detach(), u, 1.0, vocab)
    assert _rel(kl, ref) < 1e-5
    assert torch.allclose(covered, torch.ones_like(covered), atol=1e-5)


def _hf_vs_megatron_on_cuda(arch: str, root: str) -> dict:
    """Worker (world of one, NCCL): HF -> megatron, then megatron's CUDA forward in fp32 and bf16
    against transformers' forward on the CPU (float64 where it has the kernels)."""
    import torch.distributed as dist

    from checkpoints_tools.convert import hf_to_megatron
    from megatron_opd.models.hf.megatron_io import open_megatron
    from checkpoints_tools.verify import load_and_forward
    from megatron_opd.models.gpt import build_gpt_model
    from megatron_opd.runtime.checkpoint import load_checkpoint
    from megatron_opd.runtime.layout import ParallelLayout

    hf = tiny_hf_model(arch)
    hf.save_pretrained(Path(root) / "hf")
    hf_to_megatron(Path(root) / "hf", Path(root) / "mg", progress=False)
    logits, _ = load_and_forward(str(Path(root) / "mg"), {}, TOKENS)
    with torch.no_grad():
        # transformers' grouped expert matmul has no float64 kernel: MoE references run in float32.
        ref_dtype = torch.float32 if arch.endswith("moe") else F64
        reference = hf.to(ref_dtype)(torch.tensor(TOKENS)).logits.to(F64)
    model = open_megatron(Path(root) / "mg")
    net = build_gpt_model(model.cfg, ParallelLayout(), dtype=torch.bfloat16)
    load_checkpoint(model.step_dir, [net], load_rng=False)
    ids = torch.tensor(TOKENS, device="cuda")
    with torch.no_grad():
        bf16 = net.eval()(
            ids, torch.arange(ids.shape[1], device="cuda").expand_as(ids), None
        )
    return {
        "backend": dist.get_backend(),
        "param_device": str(next(net.parameters()).device),
        "fp32_error": (logits.double() - reference).abs().max().item(),
        "bf16_rel_error": _rel(bf16[..., : model.cfg.vocab_size].float(), reference),
        "scale": reference.abs().max().item(),
    }


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_megatron_on_cuda_nccl_matches_transformers(arch, tmp_path):
    from megatron_opd.runtime.spawn import spawn_world

    found = spawn_world(
        _hf_vs_megatron_on_cuda, 1, (arch, str(tmp_path)), timeout_s=600
    )[0]
    print(arch, found)
    assert "nccl" in found["backend"] and found["param_device"].startswith("cuda")
    assert found["fp32_error"] <= 1e-4, found  # TF32 is off by default for matmuls
    assert found["bf16_rel_error"] < 3e-2, found


def _train_losses(run_dir: Path, precision: str) -> list[float]:
    cmd = [
        sys.executable, "-m", "megatron_opd.cli", "train", str(REPO / "configs/tiny/sft.yaml"),
        f"run.output_dir={run_dir}", f"run.name={precision}", "run.nproc=1", "parallel.tp=1",
        f"train.precision={precision}", "train.steps=120", "train.eval_every=120", "run.log_every=10",
    ]  # fmt: skip
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = (run_dir / precision / "metrics.jsonl").read_text().splitlines()
    return [m["train/loss"] for m in map(json.loads, lines) if "train/loss" in m]


def test_bf16_training_run_on_cuda_tracks_fp32(tmp_path):
    """The CLI's training loop on the GPU (megatron DDP + Float16 optimizer with float32 main
    params) in bf16, against the same run in float32 on the same GPU."""
    fp32, bf16 = _train_losses(tmp_path, "fp32"), _train_losses(tmp_path, "bf16")
    print("fp32", fp32, "\nbf16", bf16)
    assert len(bf16) == len(fp32) == 12 and all(math.isfinite(x) for x in bf16)
    assert bf16[-1] < 0.7 * bf16[0], bf16  # it learns
    assert abs(bf16[-1] - fp32[-1]) < 0.1 * fp32[-1], (bf16[-1], fp32[-1])  # like float32 does


def _edge_case_logits(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows that exercise the kernels' online maximum across many blocks, and -inf columns."""
    gen = torch.Generator(device="cuda").manual_seed(2)
    n, width = 8, 20480
    z = 3 * torch.randn(n, width, generator=gen, device="cuda")
    u = 3 * torch.randn(n, width, generator=gen, device="cuda")
    z[0, :9000] = -math.inf  # student mass only in later blocks
    z[1, :4500] = u[1, :4500] = -math.inf  # both masked early: finite KL
    z[2] += torch.linspace(0, 60, width, device="cuda")  # the maximum rises block by block
    u[3] -= torch.linspace(0, 200, width, device="cuda")
    z[4, 15000] = 80.0  # a late spike: earlier terms underflow
    u[5, :] = -math.inf  # one-hot teacher under a spread student: KL = +inf
    u[5, 17000] = 0.0
    z[6] *= 3e3  # logits of about +-1e4
    u[6] = z[6] + torch.randn(width, generator=gen, device="cuda")
    return z.to(dtype), u.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernels_match_torch_ops_and_float64(dtype, monkeypatch):
    from megatron_opd.losses import triton_kernels

    z, u = _edge_case_logits(dtype)
    assert triton_kernels.use_triton(z, u)
    vocab, temperature = 20000, 1.3  # 480 padding columns
    upstream = torch.rand(z.shape[0], device="cuda")
    upstream[5] = 0.0  # the infinite row is masked, as a trainer masks it

    def loss_and_grad(kernels: str):
        monkeypatch.setenv("MEGATRON_OPD_LOSS_KERNELS", kernels)
        leaf = z.detach().clone().requires_grad_(True)
        kl = vocab_parallel_reverse_kl(leaf, u, temperature=temperature, vocab_size=vocab)
        (grad,) = torch.autograd.grad(kl, leaf, upstream)
        return kl, grad

    kl_fast, grad_fast = loss_and_grad("auto")
    kl_torch, grad_torch = loss_and_grad("torch")
    z64 = z.detach().to(F64).requires_grad_(True)
    ref = _reference_kl(z64, u.to(F64), temperature, vocab)
    finite = torch.isfinite(ref)
    assert finite.tolist() == [True] * 5 + [False] + [True] * 2
    assert torch.equal(torch.isfinite(kl_fast), finite.cuda())
    rows = finite.nonzero().squeeze(1)  # autograd through the infinite row would give 0 * inf
    ref_rows = _reference_kl(z64[rows], u.to(F64)[rows], temperature, vocab)
    (ref_grad,) = torch.autograd.grad(ref_rows, z64, upstream.to(F64)[rows])
    assert _rel(kl_fast[finite], ref[finite]) < 1e-5
    assert _rel(kl_fast[finite], kl_torch[finite]) < 1e-5
    assert torch.isfinite(grad_fast).all() and (grad_fast[:, vocab:] == 0).all()
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the gradient's own rounding
    assert _rel(grad_fast, ref_grad) < tol, _rel(grad_fast, ref_grad)
    assert _rel(grad_fast, grad_torch) < tol
